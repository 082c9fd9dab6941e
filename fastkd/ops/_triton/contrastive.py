"""Cross-class contrastive loss in Triton: the closed form of fastkd.ops.contrastive.

Segments (group, class) are made dense on the host (torch.unique); four small kernels
then accumulate group sums, centred segment sums and group sums of those (float64
atomics), and finally write the gradient and the per-block loss partials.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._common import wrap_triton
from ..contrastive import _backward, _segments, _setup_context


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
               N, K, gscale, GRAD: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr):
    pid = tl.program_id(0)
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


@torch.library.triton_op("fastkd_triton::cross_class_contrastive_fwd", mutates_args={})
def cross_class_contrastive_fwd(outputs: torch.Tensor, labels: torch.Tensor, groups: torch.Tensor | None,
                                reduction: int, need_grad: bool) -> tuple[torch.Tensor, torch.Tensor]:
    p = outputs.contiguous()
    N, K = p.shape
    grad = torch.zeros_like(p, memory_format=torch.contiguous_format) if need_grad else p.new_empty((0,))
    if N == 0 or K == 0:
        return p.new_zeros(()), grad
    gid, sid, sg, ng, ns, G, S = _segments(labels, groups)
    pairs = int((ng * ng).sum().item() - (ns * ns).sum().item())
    if pairs <= 0:
        return p.new_zeros(()), grad
    scale = 1.0 / pairs if reduction == 1 else 1.0
    f64 = dict(dtype=torch.float64, device=p.device)
    gsum = torch.zeros(G, K, **f64)
    T = torch.zeros(S, K, **f64)
    U = torch.zeros(G, K, **f64)
    BR = 32
    BK = min(triton.next_power_of_2(K), 64)
    wt = wrap_triton
    wt(_scatter_rows)[(triton.cdiv(N, BR),)](p, gid, gsum, N, K, BLOCK_R=BR, BLOCK_K=BK)
    wt(_centred_sums)[(triton.cdiv(N, BR),)](p, gid, sid, gsum, ng, T, N, K, BLOCK_R=BR, BLOCK_K=BK)
    wt(_scatter_rows)[(triton.cdiv(S, BR),)](T, sg, U, S, K, BLOCK_R=BR, BLOCK_K=BK)
    nprog = triton.cdiv(N, BR)
    part = torch.empty(nprog, **f64)
    wt(_grad_rows)[(nprog,)](p, gid, sid, gsum, ng, ns, T, U, grad if need_grad else p, part, N, K,
                             4.0 * scale, GRAD=need_grad, BLOCK_R=BR, BLOCK_K=BK)
    loss = 2.0 * part.sum() + 2.0 * T.square().sum() - 2.0 * U.square().sum()
    return (loss.clamp_min(0.0) * scale).to(p.dtype), grad


torch.library.register_autograd("fastkd_triton::cross_class_contrastive_fwd", _backward,
                                setup_context=_setup_context)
