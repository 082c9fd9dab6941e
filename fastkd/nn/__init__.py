"""Drop-in loss modules built on :mod:`fastkd.ops`."""
from .losses import TVLoss

__all__ = ["TVLoss"]
from .cake import CAKELoss, CrossClassContrastiveLoss  # noqa: E402

__all__ += ["CAKELoss", "CrossClassContrastiveLoss"]
from .kd import KDLoss, kd_loss, soft_cross_entropy  # noqa: E402
__all__ += ["KDLoss", "kd_loss", "soft_cross_entropy"]
from .image_matching import ImageMatchingLoss  # noqa: E402

__all__ += ["ImageMatchingLoss"]
