"""Loss modules: thin wrappers over the functional ops."""
from __future__ import annotations

import torch
from torch import nn

from .. import ops


class TVLoss(nn.Module):
    """Total variation of a batch of images; see :func:`fastkd.ops.tv_loss`."""

    def __init__(self, p: int = 1, diagonal: bool = False, reduction: str = "mean",
                 backend: str = "auto") -> None:
        super().__init__()
        self.p, self.diagonal, self.reduction, self.backend = p, diagonal, reduction, backend

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.tv_loss(x, p=self.p, diagonal=self.diagonal, reduction=self.reduction,
                           backend=self.backend)

    def extra_repr(self) -> str:
        return f"p={self.p}, diagonal={self.diagonal}, reduction={self.reduction!r}, backend={self.backend!r}"
