"""Image matching loss between two image sets (MEKD's response matching)."""
from __future__ import annotations

import torch
from torch import nn

from .. import ops

METRICS = ("l1", "l2", "wasserstein-exact", "wasserstein-sinkhorn", "wasserstein-sliced")


class ImageMatchingLoss(nn.Module):
    """Distance between two batches of images, e.g. ``loss(G(s), G(t))`` for a frozen generator G.

    metric:
        "l1": paired, mean over samples of the mean absolute difference (MEKD's choice);
        "l2": paired, mean over samples of the squared Euclidean distance;
        "wasserstein-exact" | "wasserstein-sinkhorn" | "wasserstein-sliced": the empirical
        W_p^p between the two sets (unpaired; see :func:`fastkd.ops.wasserstein`).
    p, blur, max_iter, n_projections, seed: passed to :func:`fastkd.ops.wasserstein`.
    detach_target: treat the second argument as a constant (no gradient flows into it).
    backend: "auto", "cuda", "triton", "cpp" or "torch".

    Gradients flow through the generator into its inputs even when its parameters are
    frozen (``requires_grad_(False)``): only the images need to require grad.
    """

    def __init__(self, metric: str = "l1", *, p: float = 2, blur: float = 0.05, max_iter: int = 100,
                 n_projections: int = 128, seed: int | None = None, detach_target: bool = False,
                 backend: str = "auto") -> None:
        super().__init__()
        if metric not in METRICS:
            raise ValueError(f"ImageMatchingLoss: metric must be one of {METRICS}, got {metric!r}")
        if not isinstance(detach_target, bool):
            raise TypeError(f"ImageMatchingLoss: detach_target must be a bool, got {type(detach_target).__name__}")
        self.metric, self.p, self.blur, self.max_iter = metric, p, blur, max_iter
        self.n_projections, self.seed, self.detach_target, self.backend = n_projections, seed, detach_target, backend

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if self.detach_target:
            y = y.detach()
        if self.metric in ("l1", "l2"):
            return ops.image_distance(x, y, p=1 if self.metric == "l1" else 2, reduction="mean",
                                      backend=self.backend)
        return ops.wasserstein(x, y, method=self.metric.split("-", 1)[1], p=self.p, blur=self.blur,
                               max_iter=self.max_iter, n_projections=self.n_projections, seed=self.seed,
                               backend=self.backend)

    def extra_repr(self) -> str:
        s = f"metric={self.metric!r}"
        if self.metric.startswith("wasserstein"):
            s += f", p={self.p}"
        if self.metric == "wasserstein-sinkhorn":
            s += f", blur={self.blur}, max_iter={self.max_iter}"
        if self.metric == "wasserstein-sliced":
            s += f", n_projections={self.n_projections}, seed={self.seed}"
        return s + f", backend={self.backend!r}"
