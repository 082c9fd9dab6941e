"""BatchNorm-statistics alignment loss: ``fastkd.ops.bn_stats_loss`` (DeepInversion's prior).

Definition (the reference :func:`bn_stats_loss_reference` is the specification): for
activations x of shape (N, C, H, W) (or (N, C)), with per-channel batch mean
mu_c = mean over (n, h, w) of x[n, c, h, w] and biased batch variance
var_c = mean over (n, h, w) of (x - mu_c)^2,

    loss = ||mu - running_mean||_2 + ||var - running_var||_2

(the sum of two un-squared L2 norms over the channels, as DeepInversion). Gradients flow
to x and, when they require it, to the running statistics. The gradient of a norm that
is exactly zero is taken as zero (like ``torch.linalg.vector_norm``).

The fused backends compute mean and variance in one pass over x (per (sample, channel)
plane: a cache-resident two-pass mean / squared-deviation, combined across planes with
Chan's formula, accumulating in fp32 for fp16/bf16 and fp64 across planes on the CPU).
The backward pass reads x once more and writes the gradient
dloss/dx = g * (a_c / M + 2 b_c (x - mu_c) / M), a_c = (mu_c - rm_c) / ||mu - rm||,
b_c = (var_c - rv_c) / ||var - rv||, M = N*H*W: 12 bytes per fp32 element in all.
"""
from __future__ import annotations

import torch

from .. import _backend as B
from ._common import check_float, check_tensor, compute_dtype, triton_autograd

__all__ = ["bn_stats_loss", "bn_stats_loss_reference", "batch_stats_reference"]


def batch_stats_reference(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel batch mean and biased variance of (N, C, ...) in the compute dtype."""
    xf = x.to(compute_dtype(x.dtype))
    dims = [0] + list(range(2, x.dim()))
    mean = xf.mean(dim=dims)
    var = (xf - mean.view([1, -1] + [1] * (x.dim() - 2))).square().mean(dim=dims)
    return mean, var


def bn_stats_loss_reference(x: torch.Tensor, running_mean: torch.Tensor,
                            running_var: torch.Tensor) -> torch.Tensor:
    """Plain-PyTorch BN-statistics loss: the specification every backend is tested against."""
    cd = compute_dtype(x.dtype)
    mean, var = batch_stats_reference(x)
    loss = (torch.linalg.vector_norm(mean - running_mean.to(cd))
            + torch.linalg.vector_norm(var - running_var.to(cd)))
    return loss.to(x.dtype)


def _check(x, running_mean, running_var) -> None:
    op = "bn_stats_loss"
    check_float("x", x, op)
    if x.dim() not in (2, 4):
        raise ValueError(f"{op}: x must have shape (N, C, H, W) or (N, C), got {x.dim()}-D shape "
                         f"{tuple(x.shape)}")
    if x.shape[0] == 0 or x.shape[1] == 0 or x.numel() == 0:
        raise ValueError(f"{op}: x must hold at least one element per channel, got shape {tuple(x.shape)}")
    C = x.shape[1]
    for name, t in (("running_mean", running_mean), ("running_var", running_var)):
        check_float(name, t, op)
        if t.dim() != 1 or t.shape[0] != C:
            raise ValueError(f"{op}: {name} must have shape ({C},) to match x's {C} channels, got "
                             f"shape {tuple(t.shape)}")
        if t.device != x.device:
            raise ValueError(f"{op}: {name} is on {t.device} but x is on {x.device}")


def _fused_fwd(name: str):
    if name == "triton":
        from ._triton import bn_stats as _tb  # noqa: F401  (registers fastkd_triton::bn_stats_*)

        return torch.ops.fastkd_triton.bn_stats_fwd
    return torch.ops.fastkd.bn_stats_fwd


def bn_stats_loss(x: torch.Tensor, running_mean: torch.Tensor, running_var: torch.Tensor, *,
                  backend: str = "auto") -> torch.Tensor:
    """||batch mean - running_mean|| + ||batch var - running_var|| over the channels of x.

    Args:
        x: float tensor (fp16, bf16, fp32 or fp64), (N, C, H, W) or (N, C); any layout.
        running_mean, running_var: (C,) float tensors on x's device (e.g. a BatchNorm
            layer's buffers). Cast to fp32 for fp16/bf16 x.
        backend: "auto", "cuda", "triton", "cpp" or "torch".

    Returns the scalar loss in x's dtype. The variance is the biased batch variance.
    """
    check_tensor("x", x, "bn_stats_loss")
    _check(x, running_mean, running_var)
    be = B.resolve("bn_stats_loss", backend, x.device)
    if be == "torch":
        return bn_stats_loss_reference(x, running_mean, running_var)
    cd = compute_dtype(x.dtype)
    loss, _mean, _var, _norms = _fused_fwd(be)(x, running_mean.to(cd), running_var.to(cd))
    return loss


# --------------------------------------------------------------------------- registration
def _setup_context(ctx, inputs, output):
    x, rm, rv = inputs
    _loss, mean, var, norms = output
    ctx.save_for_backward(x, mean, var, rm, rv, norms)
    ctx.set_materialize_grads(False)


def _make_backward(bwd_op):
    def _backward(ctx, grad_loss, _gm, _gv, _gn):
        x, mean, var, rm, rv, norms = ctx.saved_tensors
        if grad_loss is None:
            return None, None, None
        gx = grm = grv = None
        g = grad_loss.to(mean.dtype)
        if ctx.needs_input_grad[0]:
            gx = bwd_op()(g, x, mean, var, rm, rv, norms)
        if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
            n = norms.to(mean.dtype)
            safe = torch.where(n > 0, n, torch.ones_like(n))
            a = torch.where(n[0] > 0, (mean - rm) / safe[0], torch.zeros_like(mean))
            b = torch.where(n[1] > 0, (var - rv) / safe[1], torch.zeros_like(var))
            if ctx.needs_input_grad[1]:
                grm = (-a * g).to(rm.dtype)
            if ctx.needs_input_grad[2]:
                grv = (-b * g).to(rv.dtype)
        return gx, grm, grv
    return _backward


def _fwd_fake(x, rm, rv):
    cd = compute_dtype(x.dtype)
    C = x.shape[1]
    return (x.new_empty(()), x.new_empty((C,), dtype=cd), x.new_empty((C,), dtype=cd),
            x.new_empty((2,), dtype=cd))


def _bwd_fake(g, x, mean, var, rm, rv, norms):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def register_cpp() -> None:
    torch.library.register_fake("fastkd::bn_stats_fwd")(_fwd_fake)
    torch.library.register_fake("fastkd::bn_stats_bwd")(_bwd_fake)
    torch.library.register_autograd("fastkd::bn_stats_fwd", _make_backward(lambda: torch.ops.fastkd.bn_stats_bwd),
                                    setup_context=_setup_context)


if B.has_extension():
    register_cpp()


triton_autograd("fastkd_triton::bn_stats_fwd",
                lambda m: (_make_backward(lambda: torch.ops.fastkd_triton.bn_stats_bwd), _setup_context))
