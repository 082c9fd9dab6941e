"""Paired image distance: ``fastkd.ops.image_distance``.

Definition (the reference :func:`image_distance_reference` is the specification): a and b
have the same shape (N, ...); each sample is flattened to D = prod(shape[1:]) values.

* p=1: per-sample value ``mean_d |a[i, d] - b[i, d]|`` (MEKD's image matching term);
* p=2: per-sample value ``sum_d (a[i, d] - b[i, d])**2`` (squared Euclidean distance).

reduction: ``"mean"`` the mean over samples, ``"sum"`` their sum, ``"none"`` the (N,) values.

The fused backends read a and b once and write d loss / d a in the same pass (when a
gradient is needed); d loss / d b is its negative, so the backward pass only scales it.
Accumulation is in fp32 for fp16/bf16 inputs (fp64 for fp64).
"""
from __future__ import annotations

import torch

from .. import _backend as B
from ._common import check_float_pair, check_reduction, compute_dtype, triton_autograd

__all__ = ["image_distance", "image_distance_reference"]


def image_distance_reference(a: torch.Tensor, b: torch.Tensor, p: int = 1,
                             reduction: str = "mean") -> torch.Tensor:
    """Plain-PyTorch paired distance: the specification every backend is tested against."""
    ct = compute_dtype(a.dtype)
    d = (a.to(ct) - b.to(ct)).flatten(1)
    per = d.abs().mean(1) if p == 1 else (d * d).sum(1)
    if reduction == "none":
        out = per
    elif reduction == "sum":
        out = per.sum()
    else:
        out = per.mean()
    return out.to(a.dtype)


def _check(a, b, p, reduction) -> int:
    op = "image_distance"
    check_float_pair(op, a, b)
    if a.dim() < 1:
        raise ValueError(f"{op}: a must have a leading sample dimension (N, ...), got a 0-D tensor")
    if a.shape != b.shape:
        raise ValueError(f"{op}: b must have the same shape as a, got a {tuple(a.shape)} and b {tuple(b.shape)}")
    if a.shape[0] == 0 or a.numel() == 0:
        raise ValueError(f"{op}: a must hold at least one sample with at least one value, got shape "
                         f"{tuple(a.shape)}")
    if isinstance(p, bool) or p not in (1, 2):
        raise ValueError(f"{op}: p must be 1 or 2, got {p!r}")
    return check_reduction(reduction, op)


def _fused_op(name: str):
    if name == "triton":
        from ._triton import image_distance as _ti  # noqa: F401  (registers the Triton op)

        return torch.ops.fastkd_triton.image_distance_fwd
    return torch.ops.fastkd.image_distance_fwd


def image_distance(a: torch.Tensor, b: torch.Tensor, *, p: int = 1, reduction: str = "mean",
                   backend: str = "auto") -> torch.Tensor:
    """Paired distance between a[i] and b[i] (any trailing shape, flattened per sample).

    Args:
        a, b: float tensors of the same shape (N, ...), same dtype and device.
        p: 1 (mean absolute difference per sample) or 2 (squared Euclidean distance per sample).
        reduction: "mean" over samples, "sum", or "none" (per-sample values, shape (N,)).
        backend: "auto", "cuda", "triton", "cpp" or "torch".
    """
    code = _check(a, b, p, reduction)
    be = B.resolve("image_distance", backend, a.device)
    if be == "torch":
        return image_distance_reference(a, b, p, reduction)
    need_grad = torch.is_grad_enabled() and (a.requires_grad or b.requires_grad)
    loss, _ = _fused_op(be)(a, b, p, code, need_grad)
    return loss


# --------------------------------------------------------------------------- registration
def _setup_context(ctx, inputs, output):
    a, _b, _p, reduction, need_grad = inputs
    ctx.reduction = reduction
    ctx.need_grad = need_grad
    ctx.shape = a.shape
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(output[1])


def _backward(ctx, grad_loss, _grad_grad):
    if grad_loss is None:
        return None, None, None, None, None
    if not ctx.need_grad:
        raise RuntimeError("image_distance: backward through a call made with need_grad=False")
    (saved,) = ctx.saved_tensors
    if ctx.reduction == 0:
        g = saved * grad_loss.to(saved.dtype).view((-1,) + (1,) * (saved.dim() - 1))
    else:
        g = saved * grad_loss.to(saved.dtype)
    ga = g if ctx.needs_input_grad[0] else None
    gb = -g if ctx.needs_input_grad[1] else None
    return ga, gb, None, None, None


def _fake(a, b, p, reduction, need_grad):
    loss = a.new_empty((a.shape[0],)) if reduction == 0 else a.new_empty(())
    grad = a.new_empty(a.shape) if need_grad else a.new_empty((0,))
    return loss, grad


def register_cpp() -> None:
    torch.library.register_fake("fastkd::image_distance_fwd")(_fake)
    torch.library.register_autograd("fastkd::image_distance_fwd", _backward, setup_context=_setup_context)


if B.has_extension():
    register_cpp()


triton_autograd("fastkd_triton::image_distance_fwd", lambda m: (_backward, _setup_context))
