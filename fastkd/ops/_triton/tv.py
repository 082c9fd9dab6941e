"""Total variation in Triton: loss and gradient in one pass (see fastkd.ops.tv)."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._common import wrap_triton
from ..tv import _tv_backward, _tv_setup_context, tv_num_terms


@triton.jit
def _f(v, P: tl.constexpr):
    if P == 1:
        return tl.abs(v)
    else:
        return v * v


@triton.jit
def _g(v, P: tl.constexpr):
    if P == 1:
        return (v > 0).to(v.dtype) - (v < 0).to(v.dtype)
    else:
        return 2.0 * v


@triton.jit
def _tv_fwd_kernel(x_ptr, g_ptr, part_ptr, per_sample, HW, H, W, scale, nblk,
                   P: tl.constexpr, DIAG: tl.constexpr, GRAD: tl.constexpr, ACC: tl.constexpr,
                   BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    n = tl.program_id(1).to(tl.int64)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    m = offs < per_sample
    hw = offs % HW
    h = hw // W
    w = hw % W
    u = m & (h > 0)
    d = m & (h < H - 1)
    lft = m & (w > 0)
    r = m & (w < W - 1)
    base = x_ptr + n * per_sample
    c = tl.load(base + offs, mask=m, other=0.0).to(ACC)
    zero = tl.zeros([BLOCK], ACC)
    acc = zero
    g = zero
    v = tl.load(base + offs + 1, mask=r, other=0.0).to(ACC) - c
    acc += tl.where(r, _f(v, P), zero)
    g -= tl.where(r, _g(v, P), zero)
    v = tl.load(base + offs + W, mask=d, other=0.0).to(ACC) - c
    acc += tl.where(d, _f(v, P), zero)
    g -= tl.where(d, _g(v, P), zero)
    if DIAG:
        dr = d & r
        v = tl.load(base + offs + W + 1, mask=dr, other=0.0).to(ACC) - c
        acc += tl.where(dr, _f(v, P), zero)
        g -= tl.where(dr, _g(v, P), zero)
        dl = d & lft
        v = tl.load(base + offs + W - 1, mask=dl, other=0.0).to(ACC) - c
        acc += tl.where(dl, _f(v, P), zero)
        g -= tl.where(dl, _g(v, P), zero)
    if GRAD:
        v = c - tl.load(base + offs - 1, mask=lft, other=0.0).to(ACC)
        g += tl.where(lft, _g(v, P), zero)
        v = c - tl.load(base + offs - W, mask=u, other=0.0).to(ACC)
        g += tl.where(u, _g(v, P), zero)
        if DIAG:
            ul = u & lft
            v = c - tl.load(base + offs - W - 1, mask=ul, other=0.0).to(ACC)
            g += tl.where(ul, _g(v, P), zero)
            ur = u & r
            v = c - tl.load(base + offs - W + 1, mask=ur, other=0.0).to(ACC)
            g += tl.where(ur, _g(v, P), zero)
        tl.store(g_ptr + n * per_sample + offs, (g * scale).to(g_ptr.dtype.element_ty), mask=m)
    tl.store(part_ptr + n * nblk + pid, tl.sum(acc, axis=0))


@torch.library.triton_op("fastkd_triton::tv_loss_fwd", mutates_args={})
def tv_loss_fwd(x: torch.Tensor, p: int, diagonal: bool, reduction: int,
                need_grad: bool) -> tuple[torch.Tensor, torch.Tensor]:
    x = x.contiguous()
    N, C, H, W = x.shape
    per_sample = C * H * W
    if per_sample >= 2**31:
        raise ValueError("tv_loss (triton backend): at most 2**31 - 1 elements per sample")
    BLOCK = 1024
    nblk = triton.cdiv(per_sample, BLOCK)
    acc_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    part = torch.empty((N, nblk), dtype=acc_dtype, device=x.device)
    grad = torch.empty_like(x, memory_format=torch.contiguous_format) if need_grad else x.new_empty((0,))
    terms = tv_num_terms(x.shape, diagonal)
    scale = 1.0 / terms if reduction == 1 else 1.0
    wrap_triton(_tv_fwd_kernel)[(nblk, N)](
        x, grad if need_grad else x, part, per_sample, H * W, H, W, scale, nblk,
        P=p, DIAG=diagonal, GRAD=need_grad,
        ACC=tl.float64 if acc_dtype == torch.float64 else tl.float32, BLOCK=BLOCK)
    loss = part.sum(1) if reduction == 0 else part.sum() * scale
    return loss.to(x.dtype), grad


torch.library.register_autograd("fastkd_triton::tv_loss_fwd", _tv_backward, setup_context=_tv_setup_context)
