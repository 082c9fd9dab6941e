"""CAKE losses: the cross-class contrastive term and the full CAKE synthesis objective."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .. import ops

_ON = ("logits", "probs")


def _check_on(on: str, who: str) -> str:
    if on not in _ON:
        raise ValueError(f"{who}: contrastive_on must be one of {_ON}, got {on!r}")
    return on


class CrossClassContrastiveLoss(nn.Module):
    """Sum (or mean) over ordered pairs with different labels (within a group) of
    ||p_i - p_j||^2; see :func:`fastkd.ops.cross_class_contrastive`.

    Args:
        reduction: "sum" (default) or "mean" (divided by the number of pairs).
        contrastive_on: "logits" (default: p = outputs) or "probs" (p = softmax(outputs)).
        backend: op backend.
    """

    def __init__(self, reduction: str = "sum", contrastive_on: str = "logits", backend: str = "auto") -> None:
        super().__init__()
        if reduction not in ("sum", "mean"):
            raise ValueError(f"CrossClassContrastiveLoss: reduction must be 'sum' or 'mean', got {reduction!r}")
        self.reduction, self.backend = reduction, backend
        self.contrastive_on = _check_on(contrastive_on, "CrossClassContrastiveLoss")

    def forward(self, outputs: torch.Tensor, labels: torch.Tensor,
                groups: torch.Tensor | None = None) -> torch.Tensor:
        p = outputs.softmax(-1) if self.contrastive_on == "probs" else outputs
        return ops.cross_class_contrastive(p, labels, groups=groups, reduction=self.reduction,
                                           backend=self.backend)

    def extra_repr(self) -> str:
        return f"reduction={self.reduction!r}, contrastive_on={self.contrastive_on!r}, backend={self.backend!r}"


class CAKELoss(nn.Module):
    """CAKE's synthesis objective on a batch of synthetic inputs x:

        w_cls * L_cls + w_contr * L_contr + w_tv * L_tv

    L_cls is the cross-entropy of the teacher's logits against the drawn labels; L_contr
    the cross-class contrastive term on the teacher's outputs (logits by default, or
    probabilities), over pairs inside groups; L_tv the anisotropic total variation of x
    (p = ``tv_p``). How each term is normalised (see docs/ops-cake.md):

    ``normalization="authors"`` (default) reproduces the scaling of the authors' released
    code, so their weights (w_cls 1e3, w_contr 1e1, w_tv 1e5; the defaults here) mean the
    same thing. With N samples, G groups, K classes and S the contrastive sum:
        L_cls   = G * mean_i CE_i
        L_contr = 0.5 * G * S / ((N / G)^2 * K)    (their MSE mean over (group, i, j, class)
                                                    entries times 0.5 * G^2)
        L_tv    = tv_loss(x, p=tv_p, reduction="mean")  (mean absolute difference)
    ``normalization="mean"`` uses scale-free terms: L_cls = mean CE, L_contr = S / (P * K)
    (mean over the P valid pairs and the K entries), L_tv as above. The authors' weights
    map onto it as w_cls * G and w_contr * 0.5 * G^2 * (m - 1) / m with m = N / G
    (the group size; exact when every group has m distinct labels).

    Groups: ``forward(..., groups=...)`` takes them explicitly; otherwise consecutive
    chunks of ``group_size`` samples form the groups (default: the number of classes,
    the authors' layout where each group holds one sample of every class).
    """

    def __init__(self, w_cls: float = 1e3, w_contr: float = 1e1, w_tv: float = 1e5, *,
                 contrastive_on: str = "logits", normalization: str = "authors", tv_p: int = 1,
                 group_size: int | None = None, backend: str = "auto") -> None:
        super().__init__()
        for name, v in (("w_cls", w_cls), ("w_contr", w_contr), ("w_tv", w_tv)):
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                raise TypeError(f"CAKELoss: {name} must be a number, got {type(v).__name__}")
        if normalization not in ("authors", "mean"):
            raise ValueError(f"CAKELoss: normalization must be 'authors' or 'mean', got {normalization!r}")
        if group_size is not None and (isinstance(group_size, bool) or not isinstance(group_size, int)
                                       or group_size < 1):
            raise ValueError(f"CAKELoss: group_size must be None or a positive int, got {group_size!r}")
        if tv_p not in (1, 2) or isinstance(tv_p, bool):
            raise ValueError(f"CAKELoss: tv_p must be 1 or 2, got {tv_p!r}")
        self.w_cls, self.w_contr, self.w_tv = float(w_cls), float(w_contr), float(w_tv)
        self.contrastive_on = _check_on(contrastive_on, "CAKELoss")
        self.normalization, self.tv_p, self.group_size, self.backend = normalization, tv_p, group_size, backend
        self.last_terms: dict[str, float] = {}

    def terms(self, x: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor,
              groups: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """The three unweighted (but normalised) terms."""
        if teacher_logits.dim() != 2:
            raise ValueError(f"CAKELoss: teacher_logits must have shape (N, K), got {tuple(teacher_logits.shape)}")
        n, k = teacher_logits.shape
        if groups is None:
            gs = self.group_size or k
            groups = torch.arange(n, device=labels.device) // gs
        num_groups = int(torch.unique(groups).numel()) if n else 1
        cls = F.cross_entropy(teacher_logits, labels)
        p = teacher_logits.softmax(-1) if self.contrastive_on == "probs" else teacher_logits
        if self.normalization == "authors":
            s = ops.cross_class_contrastive(p, labels, groups=groups, reduction="sum", backend=self.backend)
            m = n / num_groups
            contr = s * (0.5 * num_groups / (m * m * k))
            cls = cls * num_groups
        else:
            contr = ops.cross_class_contrastive(p, labels, groups=groups, reduction="mean",
                                                backend=self.backend) / k
        out = {"cls": cls, "contr": contr}
        if self.w_tv != 0.0:
            out["tv"] = ops.tv_loss(x, p=self.tv_p, reduction="mean", backend=self.backend)
        else:
            out["tv"] = x.new_zeros(())
        return out

    def forward(self, x: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor,
                groups: torch.Tensor | None = None) -> torch.Tensor:
        t = self.terms(x, teacher_logits, labels, groups)
        return self.w_cls * t["cls"] + self.w_contr * t["contr"] + self.w_tv * t["tv"]

    def extra_repr(self) -> str:
        return (f"w_cls={self.w_cls:g}, w_contr={self.w_contr:g}, w_tv={self.w_tv:g}, "
                f"contrastive_on={self.contrastive_on!r}, normalization={self.normalization!r}, tv_p={self.tv_p}")
