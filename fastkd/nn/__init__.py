"""Drop-in loss modules built on :mod:`fastkd.ops`."""
from .losses import TVLoss

__all__ = ["TVLoss"]
from .bn_stats import BNStatsLoss  # noqa: E402
__all__ += ["BNStatsLoss"]
