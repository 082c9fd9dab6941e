"""BatchNorm-statistics loss in Triton (see fastkd.ops.bn_stats).

Forward: one program per (channel, chunk); each reduces a chunk of one channel's N*S elements to
shifted sums (x - K_c) and (x - K_c)^2 with K_c = x[0, c, 0] (limits cancellation); the
(C, chunks) partials are folded into mean, variance and the two norms. Backward: one
elementwise pass, grad = a_c + b_c * (x - mu_c).

Channels-last 4-D activations (what a BN hook sees in a channels-last network) are read in
place: the forward reduces (rows, channels) tiles, the backward writes a channels-last
gradient. Element indices are split into (sample, position) or channel with 32-bit division when
every index fits (I32; 64-bit integer division is several times slower on a GPU).
"""
from __future__ import annotations

import sys

import torch
import triton
import triton.language as tl

from .._common import compute_dtype, register_triton_autograd, wrap_triton
from ._launch import grid_1d, on_device


@triton.jit
def _bn_partial_kernel(x_ptr, part_ptr, C, S, M, nchunk, ITERS, ACC: tl.constexpr, BLOCK: tl.constexpr,
                       I32: tl.constexpr):
    pid = tl.program_id(0)
    c = (pid // nchunk).to(tl.int64)
    k = pid % nchunk
    shift = tl.load(x_ptr + c * S).to(ACC)
    s1 = tl.zeros([BLOCK], ACC)
    s2 = tl.zeros([BLOCK], ACC)
    if I32:
        base = k * ITERS * BLOCK
    else:
        base = k.to(tl.int64) * ITERS * BLOCK
    for it in range(0, ITERS):
        j = base + it * BLOCK + tl.arange(0, BLOCK)
        m = j < M
        n = j // S
        s = j % S
        v = tl.load(x_ptr + n.to(tl.int64) * C * S + c * S + s, mask=m, other=0.0).to(ACC)
        d = tl.where(m, v - shift, 0.0)
        s1 += d
        s2 += d * d
    out = part_ptr + (c * nchunk + k) * 2
    tl.store(out, tl.sum(s1, axis=0))
    tl.store(out + 1, tl.sum(s2, axis=0))


@triton.jit
def _bn_partial_cl_kernel(x_ptr, part_ptr, C, R, nchunk, ITERS, ACC: tl.constexpr, BR: tl.constexpr,
                          BC: tl.constexpr):
    # Channels-last x: R = N*H*W rows of C channels. One program: BC channels x a chunk of
    # ITERS*BR rows, shifted by each channel's value in row 0 (= x[0, c, 0, 0]).
    pid = tl.program_id(0)
    cb = pid // nchunk
    k = pid % nchunk
    cols = cb * BC + tl.arange(0, BC)
    cm = cols < C
    shift = tl.load(x_ptr + cols, mask=cm, other=0.0).to(ACC)
    s1 = tl.zeros([BR, BC], ACC)
    s2 = tl.zeros([BR, BC], ACC)
    base = k.to(tl.int64) * ITERS * BR
    for it in range(0, ITERS):
        rows = base + it * BR + tl.arange(0, BR)
        m = (rows < R)[:, None] & cm[None, :]
        v = tl.load(x_ptr + rows[:, None] * C + cols[None, :], mask=m, other=0.0).to(ACC)
        d = tl.where(m, v - shift[None, :], 0.0)
        s1 += d
        s2 += d * d
    out = part_ptr + (cols.to(tl.int64) * nchunk + k) * 2
    tl.store(out, tl.sum(s1, axis=0), mask=cm)
    tl.store(out + 1, tl.sum(s2, axis=0), mask=cm)


@triton.jit
def _bn_bwd_kernel(x_ptr, g_ptr, a_ptr, b_ptr, mu_ptr, C, S, total, ACC: tl.constexpr, BLOCK: tl.constexpr,
                   I32: tl.constexpr, CL: tl.constexpr):
    if I32:
        i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    else:
        i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = i < total
    if CL:
        c = i % C  # channels last: channels vary fastest
    else:
        c = (i // S) % C
    x = tl.load(x_ptr + i, mask=m, other=0.0).to(ACC)
    a = tl.load(a_ptr + c, mask=m, other=0.0)
    b = tl.load(b_ptr + c, mask=m, other=0.0)
    mu = tl.load(mu_ptr + c, mask=m, other=0.0)
    tl.store(g_ptr + i, (a + b * (x - mu)).to(g_ptr.dtype.element_ty), mask=m)


def _acc(dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


_BLOCK = 1024
# Indices below this use 32-bit arithmetic (a module constant so that tests can lower it).
_I32_END = 2**31


def bn_partial_grid(C: int, M: int) -> tuple[int, int, tuple[int]]:
    """(blocks per program, chunks per channel, launch grid) of the forward kernel."""
    iters = max(1, min(16, triton.cdiv(M, _BLOCK * 8)))
    nchunk = triton.cdiv(M, _BLOCK * iters)
    return iters, nchunk, grid_1d(C * nchunk, "bn_stats_loss")


def bn_partial_cl_grid(C: int, R: int) -> tuple[int, int, int, int, tuple[int]]:
    """(rows per block, channels per block, blocks per program, chunks, launch grid) of the
    channels-last forward kernel: tiles of 1024 elements."""
    bc = min(triton.next_power_of_2(C), 64)
    br = _BLOCK // bc
    iters = max(1, min(16, triton.cdiv(R, br * 8)))
    nchunk = triton.cdiv(R, br * iters)
    return br, bc, iters, nchunk, grid_1d(triton.cdiv(C, bc) * nchunk, "bn_stats_loss")


def _channels_last(x: torch.Tensor) -> bool:
    return x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)


@torch.library.triton_op("fastkd_triton::bn_stats_fwd", mutates_args={})
def bn_stats_fwd(x: torch.Tensor, running_mean: torch.Tensor,
                 running_var: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    cl = _channels_last(x)
    if not cl:
        x = x.contiguous()
    N, C = x.shape[0], x.shape[1]
    S = x.numel() // (N * C)
    M = N * S
    cd = compute_dtype(x.dtype)
    if cl:
        BR, BC, ITERS, nchunk, grid = bn_partial_cl_grid(C, M)
        part = torch.empty((C, nchunk, 2), dtype=cd, device=x.device)
        with on_device(x):
            wrap_triton(_bn_partial_cl_kernel)[grid](x, part, C, M, nchunk, ITERS, ACC=_acc(cd), BR=BR, BC=BC)
        shift = x[0, :, 0, 0].to(cd)
    else:
        ITERS, nchunk, grid = bn_partial_grid(C, M)
        part = torch.empty((C, nchunk, 2), dtype=cd, device=x.device)
        with on_device(x):
            wrap_triton(_bn_partial_kernel)[grid](
                x, part, C, S, M, nchunk, ITERS, ACC=_acc(cd), BLOCK=_BLOCK,
                I32=nchunk * ITERS * _BLOCK < _I32_END)
        shift = x.view(N, C, S)[0, :, 0].to(cd)
    sums = part.sum(1)
    d1 = sums[:, 0] / M
    mean = shift + d1
    var = (sums[:, 1] / M - d1 * d1).clamp_min(0)
    norms = torch.stack([torch.linalg.vector_norm(mean - running_mean.to(cd)),
                         torch.linalg.vector_norm(var - running_var.to(cd))])
    return norms.sum().to(x.dtype), mean, var, norms


@torch.library.triton_op("fastkd_triton::bn_stats_bwd", mutates_args={})
def bn_stats_bwd(grad: torch.Tensor, x: torch.Tensor, mean: torch.Tensor, var: torch.Tensor,
                 running_mean: torch.Tensor, running_var: torch.Tensor, norms: torch.Tensor) -> torch.Tensor:
    cl = _channels_last(x)
    if not cl:
        x = x.contiguous()
    N, C = x.shape[0], x.shape[1]
    S = x.numel() // (N * C)
    M = N * S
    cd = mean.dtype
    g = grad.to(cd)
    safe = torch.where(norms > 0, norms, torch.ones_like(norms))
    a = torch.where(norms[0] > 0, g * (mean - running_mean.to(cd)) / (safe[0] * M), torch.zeros_like(mean))
    b = torch.where(norms[1] > 0, 2 * g * (var - running_var.to(cd)) / (safe[1] * M), torch.zeros_like(var))
    gx = torch.empty_like(x, memory_format=torch.channels_last if cl else torch.contiguous_format)
    total = x.numel()
    with on_device(x):
        wrap_triton(_bn_bwd_kernel)[grid_1d(triton.cdiv(total, _BLOCK), "bn_stats_loss")](
            x, gx, a.contiguous(), b.contiguous(), mean.contiguous(), C, S, total, ACC=_acc(cd), BLOCK=_BLOCK,
            I32=triton.cdiv(total, _BLOCK) * _BLOCK < _I32_END, CL=cl)
    return gx


register_triton_autograd("fastkd_triton::bn_stats_fwd", sys.modules[__name__])
