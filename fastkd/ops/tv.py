"""Total variation loss: ``fastkd.ops.tv_loss``.

Definition (the reference :func:`tv_loss_reference` is the specification): for x of shape
(N, C, H, W), the difference terms are x[h+1, w] - x[h, w] (vertical), x[h, w+1] - x[h, w]
(horizontal) and, with ``diagonal=True``, x[h+1, w+1] - x[h, w] and x[h+1, w-1] - x[h, w].
p=1 sums their absolute values, p=2 their squares.

reduction: ``"sum"`` the total; ``"mean"`` the total divided by the number of difference
terms (N * C * terms per plane); ``"none"`` the per-sample sums, shape (N,).

The fused backends compute the loss and its gradient in one pass over x (the gradient
is written during the forward pass when x requires grad; the backward pass only scales
it by the incoming gradient). Accumulation is in fp32 for fp16/bf16 inputs.
"""
from __future__ import annotations

import torch

from .. import _backend as B
from ._common import check_float, check_reduction, compute_dtype, triton_autograd, tv_num_terms

__all__ = ["tv_loss", "tv_loss_and_grad", "tv_loss_reference", "tv_num_terms"]


def tv_loss_reference(x: torch.Tensor, p: int = 1, diagonal: bool = False,
                      reduction: str = "mean") -> torch.Tensor:
    """Plain-PyTorch total variation: the specification every backend is tested against."""
    xf = x.to(compute_dtype(x.dtype))
    diffs = [xf[:, :, 1:, :] - xf[:, :, :-1, :], xf[:, :, :, 1:] - xf[:, :, :, :-1]]
    if diagonal:
        diffs += [xf[:, :, 1:, 1:] - xf[:, :, :-1, :-1], xf[:, :, 1:, :-1] - xf[:, :, :-1, 1:]]
    per_sample = sum((d.abs() if p == 1 else d * d).flatten(1).sum(1) for d in diffs)
    if reduction == "none":
        out = per_sample
    elif reduction == "sum":
        out = per_sample.sum()
    else:
        out = per_sample.sum() / tv_num_terms(x.shape, diagonal)
    return out.to(x.dtype)


def _check(x, p, diagonal, reduction) -> int:
    op = "tv_loss"
    check_float("x", x, op)
    if x.dim() != 4:
        raise ValueError(f"{op}: x must have shape (N, C, H, W), got {x.dim()}-D shape {tuple(x.shape)}")
    if x.shape[2] < 2 and x.shape[3] < 2:
        raise ValueError(f"{op}: x needs H >= 2 or W >= 2 to have any difference term, got "
                         f"H={x.shape[2]}, W={x.shape[3]}")
    if x.shape[0] == 0 or x.shape[1] == 0:
        raise ValueError(f"{op}: x must hold at least one sample and one channel, got shape {tuple(x.shape)}")
    if isinstance(p, bool) or p not in (1, 2):
        raise ValueError(f"{op}: p must be 1 or 2, got {p!r}")
    if not isinstance(diagonal, bool):
        raise TypeError(f"{op}: diagonal must be a bool, got {type(diagonal).__name__}")
    return check_reduction(reduction, op)


def _fused_op(name: str):
    if name == "triton":
        from ._triton import tv as _tt  # noqa: F401  (registers fastkd_triton::tv_loss_fwd)

        return torch.ops.fastkd_triton.tv_loss_fwd
    return torch.ops.fastkd.tv_loss_fwd


def tv_loss(x: torch.Tensor, *, p: int = 1, diagonal: bool = False, reduction: str = "mean",
            backend: str = "auto") -> torch.Tensor:
    """Anisotropic total variation of a batch of images x (N, C, H, W).

    Args:
        x: float tensor (fp16, bf16, fp32 or fp64) of shape (N, C, H, W).
        p: 1 (absolute differences) or 2 (squared differences).
        diagonal: also include both diagonal neighbours.
        reduction: "mean" (sum / number of terms), "sum", or "none" (per-sample sums, (N,)).
        backend: "auto", "cuda", "triton", "cpp" or "torch".
    """
    code = _check(x, p, diagonal, reduction)
    be = B.resolve("tv_loss", backend, x.device)
    if be == "torch":
        return tv_loss_reference(x, p, diagonal, reduction)
    need_grad = x.requires_grad and torch.is_grad_enabled()
    loss, _ = _fused_op(be)(x, p, diagonal, code, need_grad)
    return loss


def tv_loss_and_grad(x: torch.Tensor, *, p: int = 1, diagonal: bool = False, reduction: str = "mean",
                     backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """Loss and d loss / d x in one fused pass, outside autograd (for synthesis loops).

    For ``reduction="none"`` the gradient is that of ``loss.sum()``.
    """
    code = _check(x, p, diagonal, reduction)
    be = B.resolve("tv_loss", backend, x.device)
    if be == "torch":
        with torch.enable_grad():
            xd = x.detach().requires_grad_(True)
            loss = tv_loss_reference(xd, p, diagonal, reduction)
            (g,) = torch.autograd.grad(loss.sum(), xd)
        return loss.detach(), g
    with torch.no_grad():
        return _fused_op(be)(x.detach(), p, diagonal, code, True)


# --------------------------------------------------------------------------- registration
def _tv_setup_context(ctx, inputs, output):
    _x, _p, _diagonal, reduction, need_grad = inputs
    ctx.reduction = reduction
    ctx.need_grad = need_grad
    ctx.set_materialize_grads(False)  # the second output (the gradient) never receives one
    ctx.save_for_backward(output[1])


def _is_one(t: torch.Tensor) -> bool:
    """True if t is a CPU scalar equal to 1 (checked only where it costs no device sync)."""
    if torch.compiler.is_compiling() or type(t) is not torch.Tensor:
        return False
    if t.device.type != "cpu" or t.numel() != 1:
        return False
    try:  # never read values while a graph is being traced (make_fx, opcheck)
        from torch.fx.experimental.proxy_tensor import get_proxy_mode

        if get_proxy_mode() is not None:
            return False
    except ImportError:  # pragma: no cover - older torch
        return False
    return bool(t.item() == 1.0)


def _tv_backward(ctx, grad_loss, _grad_grad):
    if not ctx.need_grad:
        raise RuntimeError("tv_loss: backward through a call made with need_grad=False")
    (saved,) = ctx.saved_tensors
    if grad_loss is None:
        return None, None, None, None, None
    if ctx.reduction != 0 and _is_one(grad_loss):
        # loss.backward() on the TV term alone: the fused forward already wrote the answer.
        return saved, None, None, None, None
    if ctx.reduction == 0:
        g = saved * grad_loss.to(saved.dtype).view(-1, 1, 1, 1)
    else:
        g = saved * grad_loss.to(saved.dtype)
    return g, None, None, None, None


def _tv_fake(x, p, diagonal, reduction, need_grad):
    loss = x.new_empty((x.shape[0],)) if reduction == 0 else x.new_empty(())
    grad = x.new_empty(x.shape) if need_grad else x.new_empty((0,))
    return loss, grad


def register_cpp() -> None:
    torch.library.register_fake("fastkd::tv_loss_fwd")(_tv_fake)
    torch.library.register_autograd("fastkd::tv_loss_fwd", _tv_backward, setup_context=_tv_setup_context)


if B.has_extension():
    register_cpp()


triton_autograd("fastkd_triton::tv_loss_fwd", lambda m: (_tv_backward, _tv_setup_context))
