"""Optimizers over synthetic inputs."""
from .langevin import Langevin

__all__ = ["Langevin"]
