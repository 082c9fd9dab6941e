"""Kernel microbenchmarks behind ``fastkd bench``.

Each op has a module here exposing ``cases(device, quick) -> list[Case]``; a Case holds
the implementations to compare (fastkd backends, eager PyTorch, ``torch.compile`` of the
eager code, peer libraries) as zero-argument callables that run one forward+backward.
:func:`fastkd.bench.core.run` times them, prints a table and writes CSV, JSON and a PNG.
"""
from .core import Case, Result, register, registered_ops, run

__all__ = ["Case", "Result", "register", "registered_ops", "run"]
