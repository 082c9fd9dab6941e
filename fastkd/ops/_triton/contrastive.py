"""Cross-class contrastive loss in Triton: the closed form of fastkd.ops.contrastive.

Segments (group, class) are numbered densely with sorts and cumulative sums (no value
reaches the host, so the op traces under torch.compile); ids range over [0, N), unused
ids have empty segments. Four small kernels then accumulate group sums, centred segment
sums and group sums of those (float64 atomics), and finally write the gradient and the
per-block loss partials.
"""
from __future__ import annotations

import sys

import torch
import triton
import triton.language as tl

from .._common import register_triton_autograd, wrap_triton
from ._launch import grid_1d, on_device


@triton.jit
def _scatter_rows(src_ptr, idx_ptr, dst_ptr, R, K, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr):
    # dst[idx[r], :] += src[r, :] (float64)
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    rm = rows < R
    dst_row = tl.load(idx_ptr + rows, mask=rm, other=0)
    for k0 in range(0, K, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        m = rm[:, None] & (cols < K)[None, :]
        v = tl.load(src_ptr + rows[:, None].to(tl.int64) * K + cols[None, :], mask=m, other=0.0)
        tl.atomic_add(dst_ptr + dst_row[:, None] * K + cols[None, :], v.to(tl.float64), mask=m)


@triton.jit
def _centred_sums(p_ptr, gid_ptr, sid_ptr, gsum_ptr, ng_ptr, t_ptr, N, K,
                  BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    rm = rows < N
    g = tl.load(gid_ptr + rows, mask=rm, other=0)
    s = tl.load(sid_ptr + rows, mask=rm, other=0)
    cnt = tl.load(ng_ptr + g, mask=rm, other=1).to(tl.float64)
    for k0 in range(0, K, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        m = rm[:, None] & (cols < K)[None, :]
        p = tl.load(p_ptr + rows[:, None].to(tl.int64) * K + cols[None, :], mask=m, other=0.0).to(tl.float64)
        mean = tl.load(gsum_ptr + g[:, None] * K + cols[None, :], mask=m, other=0.0) / cnt[:, None]
        tl.atomic_add(t_ptr + s[:, None] * K + cols[None, :], p - mean, mask=m)


@triton.jit
def _grad_rows(p_ptr, gid_ptr, sid_ptr, gsum_ptr, ng_ptr, ns_ptr, t_ptr, u_ptr, g_ptr, part_ptr,
               gscale_ptr, N, K, GRAD: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr):
    # gscale_ptr: one float64, 4 / pairs for reduction="mean", else 4 (computed on the device)
    pid = tl.program_id(0)
    gscale = tl.load(gscale_ptr)
    rows = pid * BLOCK_R + tl.arange(0, BLOCK_R)
    rm = rows < N
    g = tl.load(gid_ptr + rows, mask=rm, other=0)
    s = tl.load(sid_ptr + rows, mask=rm, other=0)
    ngv = tl.load(ng_ptr + g, mask=rm, other=1)
    w = (ngv - tl.load(ns_ptr + s, mask=rm, other=1)).to(tl.float64)
    cnt = ngv.to(tl.float64)
    acc = tl.zeros([BLOCK_R], tl.float64)
    for k0 in range(0, K, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        m = rm[:, None] & (cols < K)[None, :]
        off = rows[:, None].to(tl.int64) * K + cols[None, :]
        p = tl.load(p_ptr + off, mask=m, other=0.0).to(tl.float64)
        q = p - tl.load(gsum_ptr + g[:, None] * K + cols[None, :], mask=m, other=0.0) / cnt[:, None]
        q = tl.where(m, q, 0.0)
        acc += tl.sum(q * q, axis=1)
        if GRAD:
            t = tl.load(t_ptr + s[:, None] * K + cols[None, :], mask=m, other=0.0)
            u = tl.load(u_ptr + g[:, None] * K + cols[None, :], mask=m, other=0.0)
            gr = gscale * (w[:, None] * q - (u - t))
            tl.store(g_ptr + off, gr.to(g_ptr.dtype.element_ty), mask=m)
    tl.store(part_ptr + pid, tl.sum(w * acc, axis=0))


def _dense(keys: torch.Tensor) -> torch.Tensor:
    """Dense ids of int64 keys: equal keys get equal ids, numbered from 0 in sorted order."""
    sk, perm = torch.sort(keys)
    new = torch.cat([sk.new_zeros(1), (sk[1:] != sk[:-1]).to(torch.int64)])
    return torch.empty_like(perm).scatter_(0, perm, new.cumsum(0))


def _segments_dense(labels: torch.Tensor, groups: torch.Tensor | None):
    """Group id, segment id, segment -> group, group sizes and segment sizes; ids in [0, N)."""
    n = labels.shape[0]
    gid = labels.new_zeros(n) if groups is None else _dense(groups)
    sid = _dense(gid * n + _dense(labels))
    ones = torch.ones_like(gid)
    ng = torch.zeros_like(gid).index_add_(0, gid, ones)
    ns = torch.zeros_like(sid).index_add_(0, sid, ones)
    sg = torch.zeros_like(sid).scatter_(0, sid, gid)
    return gid, sid, sg, ng, ns


_BR = 32


@torch.library.triton_op("fastkd_triton::cross_class_contrastive_fwd", mutates_args={})
def cross_class_contrastive_fwd(outputs: torch.Tensor, labels: torch.Tensor, groups: torch.Tensor | None,
                                reduction: int, need_grad: bool) -> tuple[torch.Tensor, torch.Tensor]:
    p = outputs.contiguous()
    N, K = p.shape
    grad = torch.zeros_like(p, memory_format=torch.contiguous_format) if need_grad else p.new_empty((0,))
    if N == 0 or K == 0:
        return p.new_zeros(()), grad
    gid, sid, sg, ng, ns = _segments_dense(labels, groups)
    f64 = dict(dtype=torch.float64, device=p.device)
    # Pairs: sum_g N_g^2 - sum_s n_s^2. None (every group one class): the loss and gradient
    # come out exactly 0 (w = 0 and U_g = T_s), whatever the scale.
    pairs = ((ng * ng).sum() - (ns * ns).sum()).to(torch.float64)
    scale = 1.0 / pairs.clamp_min(1.0) if reduction == 1 else torch.ones((), **f64)
    gscale = (4.0 * scale).reshape(1)
    gsum = torch.zeros(N, K, **f64)
    T = torch.zeros(N, K, **f64)
    U = torch.zeros(N, K, **f64)
    BK = min(triton.next_power_of_2(K), 64)
    grid = grid_1d(triton.cdiv(N, _BR), "cross_class_contrastive")
    part = torch.empty(grid[0], **f64)
    wt = wrap_triton
    with on_device(p):
        wt(_scatter_rows)[grid](p, gid, gsum, N, K, BLOCK_R=_BR, BLOCK_K=BK)
        wt(_centred_sums)[grid](p, gid, sid, gsum, ng, T, N, K, BLOCK_R=_BR, BLOCK_K=BK)
        wt(_scatter_rows)[grid](T, sg, U, N, K, BLOCK_R=_BR, BLOCK_K=BK)
        wt(_grad_rows)[grid](p, gid, sid, gsum, ng, ns, T, U, grad if need_grad else p, part, gscale, N, K,
                             GRAD=need_grad, BLOCK_R=_BR, BLOCK_K=BK)
    loss = 2.0 * part.sum() + 2.0 * T.square().sum() - 2.0 * U.square().sum()
    return (loss.clamp_min(0.0) * scale).to(p.dtype), grad


register_triton_autograd("fastkd_triton::cross_class_contrastive_fwd", sys.modules[__name__])
