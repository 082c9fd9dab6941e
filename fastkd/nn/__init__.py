"""Drop-in loss modules built on :mod:`fastkd.ops`."""
from .losses import TVLoss

__all__ = ["TVLoss"]
