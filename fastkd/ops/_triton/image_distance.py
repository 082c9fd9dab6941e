"""Paired image distance in Triton: loss and gradient in one pass (see fastkd.ops.image_distance)."""
from __future__ import annotations

import sys

import torch
import triton
import triton.language as tl

from .._common import register_triton_autograd, wrap_triton
from ._launch import grid_1d, on_device


# One program per (sample n, block of BLOCK elements): program id = n * nblk + block. The
# gradient is divided by the integer ``div`` in the kernel's accumulation type.
@triton.jit(do_not_specialize=["div"])
def _image_distance_kernel(a_ptr, b_ptr, g_ptr, part_ptr, D, div, nblk,
                           P: tl.constexpr, GRAD: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr):
    prog = tl.program_id(0)
    pid = prog % nblk
    n = (prog // nblk).to(tl.int64)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    m = offs < D
    x = tl.load(a_ptr + n * D + offs, mask=m, other=0.0).to(ACC)
    y = tl.load(b_ptr + n * D + offs, mask=m, other=0.0).to(ACC)
    d = x - y
    if P == 1:
        v = tl.abs(d)
        g = (d > 0).to(ACC) - (d < 0).to(ACC)
    else:
        v = d * d
        g = 2.0 * d
    if GRAD:
        gscale = 1.0 / div.to(tl.int64).to(ACC)
        tl.store(g_ptr + n * D + offs, (g * gscale).to(g_ptr.dtype.element_ty), mask=m)
    tl.store(part_ptr + n * nblk + pid, tl.sum(v, axis=0))


_BLOCK = 1024


def image_distance_grid(N: int, D: int) -> tuple[int, tuple[int]]:
    """(blocks per sample, launch grid) of the image-distance kernel."""
    nblk = triton.cdiv(D, _BLOCK)
    return nblk, grid_1d(N * nblk, "image_distance")


@torch.library.triton_op("fastkd_triton::image_distance_fwd", mutates_args={})
def image_distance_fwd(a: torch.Tensor, b: torch.Tensor, p: int, reduction: int,
                       need_grad: bool) -> tuple[torch.Tensor, torch.Tensor]:
    a = a.contiguous()
    b = b.contiguous()
    N = a.shape[0]
    D = a.numel() // N
    nblk, grid = image_distance_grid(N, D)
    acc_dtype = torch.float64 if a.dtype == torch.float64 else torch.float32
    part = torch.empty((N, nblk), dtype=acc_dtype, device=a.device)
    grad = torch.empty_like(a, memory_format=torch.contiguous_format) if need_grad else a.new_empty((0,))
    per = D if p == 1 else 1
    red = N if reduction == 1 else 1
    if grid[0]:
        with on_device(a):
            wrap_triton(_image_distance_kernel)[grid](
                a, b, grad if need_grad else a, part, D, per * red, nblk, P=p, GRAD=need_grad,
                ACC=tl.float64 if acc_dtype == torch.float64 else tl.float32, BLOCK=_BLOCK)
    per_sample = part.sum(1) / per
    loss = per_sample if reduction == 0 else per_sample.sum() / red
    return loss.to(a.dtype), grad


register_triton_autograd("fastkd_triton::image_distance_fwd", sys.modules[__name__])
