"""Hinton knowledge-distillation losses."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["KDLoss", "kd_loss", "soft_cross_entropy"]


def _check_pair(s: torch.Tensor, t: torch.Tensor, op: str) -> None:
    for name, v in (("student_logits", s), ("teacher", t)):
        if not isinstance(v, torch.Tensor):
            raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(v).__name__}")
        if not v.dtype.is_floating_point:
            raise TypeError(f"{op}: {name} must be a floating-point tensor, got dtype {v.dtype}")
    if s.dim() != 2 or s.shape != t.shape:
        raise ValueError(f"{op}: student_logits and teacher must both have shape (N, K), got "
                         f"{tuple(s.shape)} and {tuple(t.shape)}")


def _check_temperature(temperature, op: str) -> float:
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not temperature > 0:
        raise ValueError(f"{op}: temperature must be a positive number, got {temperature!r}")
    return float(temperature)


def _teacher_log_probs(t: torch.Tensor, temperature: float, target: str) -> torch.Tensor:
    if target == "probs":  # log p is the logit vector up to a per-row constant
        t = torch.log(t.float().clamp_min(1e-12))
    elif target != "logits":
        raise ValueError(f"target must be 'logits' or 'probs', got {target!r}")
    return F.log_softmax(t.float() / temperature, dim=1)


def kd_loss(student_logits: torch.Tensor, teacher: torch.Tensor, temperature: float = 4.0,
            *, target: str = "logits", reduction: str = "batchmean") -> torch.Tensor:
    """Hinton's loss: ``tau^2 * KL(softmax(t / tau) || softmax(s / tau))``.

    Args:
        student_logits: (N, K) student logits.
        teacher: (N, K) teacher logits (``target="logits"``) or probabilities at
            temperature 1 (``target="probs"``; softened as softmax(log p / tau)).
        temperature: tau > 0. The tau^2 factor keeps gradient magnitudes comparable
            across temperatures.
        reduction: "batchmean" (sum over classes, mean over samples), "sum" or "none" (N,).
    """
    op = "kd_loss"
    _check_pair(student_logits, teacher, op)
    tau = _check_temperature(temperature, op)
    if reduction not in ("batchmean", "sum", "none"):
        raise ValueError(f"{op}: reduction must be 'batchmean', 'sum' or 'none', got {reduction!r}")
    lt = _teacher_log_probs(teacher, tau, target)
    ls = F.log_softmax(student_logits.float() / tau, dim=1)
    per = (lt.exp() * (lt - ls)).sum(1) * (tau * tau)
    if reduction == "none":
        return per
    return per.sum() if reduction == "sum" else per.mean()


def soft_cross_entropy(student_logits: torch.Tensor, teacher: torch.Tensor, temperature: float = 1.0,
                       *, target: str = "probs", reduction: str = "batchmean") -> torch.Tensor:
    """Soft-target cross-entropy ``-tau^2 * sum_k q_k log softmax(s / tau)_k``, q = teacher
    distribution at temperature tau. Same gradient as :func:`kd_loss` (they differ by the
    teacher's entropy, a constant). Defaults: teacher given as probabilities, tau = 1."""
    op = "soft_cross_entropy"
    _check_pair(student_logits, teacher, op)
    tau = _check_temperature(temperature, op)
    if reduction not in ("batchmean", "sum", "none"):
        raise ValueError(f"{op}: reduction must be 'batchmean', 'sum' or 'none', got {reduction!r}")
    q = _teacher_log_probs(teacher, tau, target).exp()
    per = -(q * F.log_softmax(student_logits.float() / tau, dim=1)).sum(1) * (tau * tau)
    if reduction == "none":
        return per
    return per.sum() if reduction == "sum" else per.mean()


class KDLoss(nn.Module):
    """Hinton knowledge-distillation loss ``tau^2 * KL(softmax(t/tau) || softmax(s/tau))``.

    ``KDLoss(temperature=4.0)(student_logits, teacher_logits)``; pass ``target="probs"`` when
    the teacher gives probabilities (e.g. a :class:`fastkd.synthesis.SyntheticDataset`).
    See :func:`kd_loss`.
    """

    def __init__(self, temperature: float = 4.0, *, target: str = "logits",
                 reduction: str = "batchmean") -> None:
        super().__init__()
        _check_temperature(temperature, "KDLoss")
        if target not in ("logits", "probs"):
            raise ValueError(f"KDLoss: target must be 'logits' or 'probs', got {target!r}")
        if reduction not in ("batchmean", "sum", "none"):
            raise ValueError(f"KDLoss: reduction must be 'batchmean', 'sum' or 'none', got {reduction!r}")
        self.temperature, self.target, self.reduction = float(temperature), target, reduction

    def forward(self, student_logits: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        return kd_loss(student_logits, teacher, self.temperature, target=self.target,
                       reduction=self.reduction)

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}, target={self.target!r}, reduction={self.reduction!r}"
