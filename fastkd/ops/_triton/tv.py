"""Total variation in Triton: loss and gradient in one pass (see fastkd.ops.tv)."""
from __future__ import annotations

import sys

import torch
import triton
import triton.language as tl

from .._common import register_triton_autograd, tv_num_terms, wrap_triton
from ._launch import grid_1d, on_device


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


# One program per (sample n, block of BLOCK elements): program id = n * nblk + block. The
# gradient is divided by ``div`` (the number of terms for reduction="mean", else 1), an
# integer made a float in the kernel's accumulation type.
@triton.jit(do_not_specialize=["div"])
def _tv_fwd_kernel(x_ptr, g_ptr, part_ptr, per_sample, HW, H, W, div, nblk,
                   P: tl.constexpr, DIAG: tl.constexpr, GRAD: tl.constexpr, ACC: tl.constexpr,
                   BLOCK: tl.constexpr):
    prog = tl.program_id(0)
    pid = prog % nblk
    n = (prog // nblk).to(tl.int64)
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
        scale = 1.0 / div.to(tl.int64).to(ACC)
        tl.store(g_ptr + n * per_sample + offs, (g * scale).to(g_ptr.dtype.element_ty), mask=m)
    tl.store(part_ptr + n * nblk + pid, tl.sum(acc, axis=0))


_BLOCK = 1024


def tv_grid(N: int, per_sample: int) -> tuple[int, tuple[int]]:
    """(blocks per sample, launch grid) of the TV kernel."""
    nblk = triton.cdiv(per_sample, _BLOCK)
    return nblk, grid_1d(N * nblk, "tv_loss")


@torch.library.triton_op("fastkd_triton::tv_loss_fwd", mutates_args={})
def tv_loss_fwd(x: torch.Tensor, p: int, diagonal: bool, reduction: int,
                need_grad: bool) -> tuple[torch.Tensor, torch.Tensor]:
    x = x.contiguous()
    N, C, H, W = x.shape
    per_sample = C * H * W
    if per_sample >= 2**31:
        raise ValueError("tv_loss (triton backend): at most 2**31 - 1 elements per sample")
    nblk, grid = tv_grid(N, per_sample)
    acc_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    part = torch.empty((N, nblk), dtype=acc_dtype, device=x.device)
    grad = torch.empty_like(x, memory_format=torch.contiguous_format) if need_grad else x.new_empty((0,))
    terms = tv_num_terms(x.shape, diagonal)
    div = terms if reduction == 1 else 1
    if grid[0]:
        with on_device(x):
            wrap_triton(_tv_fwd_kernel)[grid](
                x, grad, part, per_sample, H * W, H, W, div, nblk,
                P=p, DIAG=diagonal, GRAD=need_grad,
                ACC=tl.float64 if acc_dtype == torch.float64 else tl.float32, BLOCK=_BLOCK)
    loss = part.sum(1) if reduction == 0 else part.sum() / div
    return loss.to(x.dtype), grad


register_triton_autograd("fastkd_triton::tv_loss_fwd", sys.modules[__name__])
