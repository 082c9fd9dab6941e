"""Triton kernels of fastkd.ops.ot: the distance matrix as one GEMM with the norms fused in
(entries that cancel recomputed from the differences in the same kernel), and sliced
projections whose random directions are generated inside the kernel. Every kernel takes a
one-dimensional grid of tiles."""
from __future__ import annotations

import sys

import torch
import triton
import triton.language as tl

from .._common import register_triton_autograd, sqdist_recompute_tau as _tau, wrap_triton
from ._launch import grid_1d, on_device


@triton.jit
def _sqdist_kernel(a_ptr, b_ptr, mu_ptr, out_ptr, N, M, D, nm,
                   BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, ACC: tl.constexpr,
                   RTAU: tl.constexpr, BK2: tl.constexpr):
    # One (BM, BN) tile of ||a_i - mu||^2 + ||b_j - mu||^2 - 2 (a_i - mu).(b_j - mu): the row
    # norms are accumulated from the same tiles the product reads (no extra pass). Entries
    # with d <= tau * s (s the sum of the norms: the GEMM form has cancelled) are recomputed
    # from the differences in float64, as fastkd.ops.ot's other backends do (RTAU = 1 / tau).
    pid = tl.program_id(0)
    pid_m = pid % nm
    pid_n = pid // nm
    rm = pid_m * BM + tl.arange(0, BM)
    rn = pid_n * BN + tl.arange(0, BN)
    rk = tl.arange(0, BK)
    acc = tl.zeros((BM, BN), dtype=ACC)
    na = tl.zeros((BM,), dtype=ACC)
    nb = tl.zeros((BN,), dtype=ACC)
    for k0 in range(0, D, BK):
        kk = k0 + rk
        mk = kk < D
        mu = tl.load(mu_ptr + kk, mask=mk, other=0.0).to(ACC)
        am = (rm[:, None] < N) & mk[None, :]
        bm = (rn[:, None] < M) & mk[None, :]
        x = tl.load(a_ptr + rm[:, None].to(tl.int64) * D + kk[None, :], mask=am, other=0.0).to(ACC)
        y = tl.load(b_ptr + rn[:, None].to(tl.int64) * D + kk[None, :], mask=bm, other=0.0).to(ACC)
        x = tl.where(am, x - mu[None, :], 0.0)
        y = tl.where(bm, y - mu[None, :], 0.0)
        acc += tl.dot(x, tl.trans(y), input_precision="ieee")
        na += tl.sum(x * x, axis=1)
        nb += tl.sum(y * y, axis=1)
    s = na[:, None] + nb[None, :]
    d = s - 2.0 * acc
    om = (rm[:, None] < N) & (rn[None, :] < M)
    bad = om & (d * RTAU <= s)
    if tl.max(tl.max(bad.to(tl.int32), axis=1), axis=0) > 0:
        exact = tl.zeros((BM, BN), dtype=tl.float64)
        for k0 in range(0, D, BK2):
            kk = k0 + tl.arange(0, BK2)
            mk = kk < D
            x = tl.load(a_ptr + rm[:, None].to(tl.int64) * D + kk[None, :],
                        mask=(rm[:, None] < N) & mk[None, :], other=0.0).to(tl.float64)
            y = tl.load(b_ptr + rn[:, None].to(tl.int64) * D + kk[None, :],
                        mask=(rn[:, None] < M) & mk[None, :], other=0.0).to(tl.float64)
            diff = x[:, None, :] - y[None, :, :]
            exact += tl.sum(diff * diff, axis=2)
        d = tl.where(bad, exact.to(ACC), d)
    off = rm[:, None].to(tl.int64) * M + rn[None, :]
    tl.store(out_ptr + off, d, mask=om)


_SQ_BM, _SQ_BN = 32, 32


def sqdist_grid(N: int, M: int) -> tuple[int, tuple[int]]:
    """(row tiles, launch grid) of the distance kernel."""
    nm = triton.cdiv(N, _SQ_BM)
    return nm, grid_1d(nm * triton.cdiv(M, _SQ_BN), "pairwise_sqdist")


@torch.library.triton_op("fastkd_triton::pairwise_sqdist_fwd", mutates_args={})
def pairwise_sqdist_fwd(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    ct = torch.float64 if a.dtype == torch.float64 else torch.float32
    a2 = a.to(ct).contiguous()
    b2 = b.to(ct).contiguous()
    N, D = a2.shape
    M = b2.shape[0]
    mu = (a2.sum(0) + b2.sum(0)) / (N + M)
    d = torch.empty((N, M), dtype=ct, device=a.device)
    nm, grid = sqdist_grid(N, M)
    if grid[0]:
        with on_device(a):
            wrap_triton(_sqdist_kernel)[grid](
                a2, b2, mu, d, N, M, D, nm, BM=_SQ_BM, BN=_SQ_BN, BK=32,
                ACC=tl.float64 if ct == torch.float64 else tl.float32, RTAU=1.0 / _tau(ct), BK2=4)
    return d.clamp_min(0.0).to(a.dtype)


register_triton_autograd("fastkd_triton::pairwise_sqdist_fwd", sys.modules[__name__])


@triton.jit
def _hash32(x):
    # x: uint64 holding a uint32 value; the hash of csrc/ot.h.
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & 0xFFFFFFFF
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) & 0xFFFFFFFF
    return x ^ (x >> 16)


@triton.jit
def _normals(key, d):
    # key: (BL,) uint64 direction keys; d: (BK,) int64 coordinates -> (BL, BK) fp32 normals.
    d2 = (d.to(tl.uint64) * 2) & 0xFFFFFFFF
    h1 = _hash32(key[:, None] ^ d2[None, :])
    h2 = _hash32(key[:, None] ^ (d2[None, :] + 1))
    u1 = ((h1 >> 8) + 1).to(tl.float32) * 5.9604644775390625e-08
    u2 = (h2 >> 8).to(tl.float32) * 5.9604644775390625e-08
    return tl.sqrt(-2.0 * tl.log(u1)) * tl.cos(6.2831853071795864 * u2)


@triton.jit
def _dir_keys(seed, l):
    s = _hash32(seed.to(tl.uint64) & 0xFFFFFFFF)
    return _hash32(s ^ ((l.to(tl.uint64) * 0x9E3779B9) & 0xFFFFFFFF))


@triton.jit(do_not_specialize=["seed"])
def _project_kernel(x_ptr, out_ptr, sq_ptr, seed, N, D, L, nm,
                    BM: tl.constexpr, BL: tl.constexpr, BK: tl.constexpr, ACC: tl.constexpr):
    pid = tl.program_id(0)
    pid_m = pid % nm
    pid_l = pid // nm
    rm = pid_m * BM + tl.arange(0, BM)
    rl = pid_l * BL + tl.arange(0, BL)
    key = _dir_keys(seed, rl)
    acc = tl.zeros((BM, BL), dtype=ACC)
    sq = tl.zeros((BL,), dtype=tl.float32)
    for k0 in range(0, D, BK):
        kk = k0 + tl.arange(0, BK)
        mk = kk < D
        z = _normals(key, kk.to(tl.int64))
        z = tl.where(mk[None, :], z, 0.0)
        sq += tl.sum(z * z, axis=1)
        x = tl.load(x_ptr + rm[:, None].to(tl.int64) * D + kk[None, :],
                    mask=(rm[:, None] < N) & mk[None, :], other=0.0).to(ACC)
        acc += tl.dot(x, tl.trans(z.to(ACC)), input_precision="ieee")
    tl.store(out_ptr + rm[:, None].to(tl.int64) * L + rl[None, :], acc,
             mask=(rm[:, None] < N) & (rl[None, :] < L))
    if pid_m == 0:
        tl.store(sq_ptr + rl, sq, mask=rl < L)


@triton.jit(do_not_specialize=["seed"])
def _backproject_kernel(g_ptr, inv_ptr, out_ptr, seed, N, D, L, nm,
                        BM: tl.constexpr, BL: tl.constexpr, BK: tl.constexpr, ACC: tl.constexpr):
    pid = tl.program_id(0)
    pid_m = pid % nm
    pid_k = pid // nm
    rm = pid_m * BM + tl.arange(0, BM)
    kk = pid_k * BK + tl.arange(0, BK)
    acc = tl.zeros((BM, BK), dtype=ACC)
    for l0 in range(0, L, BL):
        rl = l0 + tl.arange(0, BL)
        ml = rl < L
        z = _normals(_dir_keys(seed, rl), kk.to(tl.int64)).to(ACC)
        inv = tl.load(inv_ptr + rl, mask=ml, other=0.0).to(ACC)
        z = z * inv[:, None]
        g = tl.load(g_ptr + rm[:, None].to(tl.int64) * L + rl[None, :],
                    mask=(rm[:, None] < N) & ml[None, :], other=0.0).to(ACC)
        acc += tl.dot(g, z, input_precision="ieee")
    tl.store(out_ptr + rm[:, None].to(tl.int64) * D + kk[None, :], acc,
             mask=(rm[:, None] < N) & (kk[None, :] < D))


_BM, _BL, _BK = 16, 16, 64


def project_grid(N: int, L: int) -> tuple[int, tuple[int]]:
    """(row tiles, launch grid) of the projection kernel: (N / BM) x (L / BL) tiles."""
    nm = triton.cdiv(N, _BM)
    return nm, grid_1d(nm * triton.cdiv(L, _BL), "sliced projections")


def backproject_grid(N: int, D: int) -> tuple[int, tuple[int]]:
    """(row tiles, launch grid) of the back-projection kernel: (N / BM) x (D / BK) tiles."""
    nm = triton.cdiv(N, _BM)
    return nm, grid_1d(nm * triton.cdiv(D, _BK), "sliced projections")


@torch.library.triton_op("fastkd_triton::sliced_project", mutates_args={})
def sliced_project(x: torch.Tensor, n_projections: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    ct = torch.float64 if x.dtype == torch.float64 else torch.float32
    x2 = x.to(ct).contiguous()
    N, D = x2.shape
    L = n_projections
    out = torch.empty((N, L), dtype=ct, device=x.device)
    sq = torch.empty((L,), dtype=torch.float32, device=x.device)
    nm, grid = project_grid(N, L)
    if grid[0]:
        with on_device(x):
            wrap_triton(_project_kernel)[grid](
                x2, out, sq, seed & 0xFFFFFFFF, N, D, L, nm, BM=_BM, BL=_BL, BK=_BK,
                ACC=tl.float64 if ct == torch.float64 else tl.float32)
    inv = torch.rsqrt(sq.to(ct))
    return (out * inv).to(x.dtype), inv


@torch.library.triton_op("fastkd_triton::sliced_backproject", mutates_args={})
def sliced_backproject(g: torch.Tensor, inv_norm: torch.Tensor, D: int, seed: int) -> torch.Tensor:
    ct = torch.float64 if g.dtype == torch.float64 else torch.float32
    g2 = g.to(ct).contiguous()
    N, L = g2.shape
    out = torch.empty((N, D), dtype=ct, device=g.device)
    nm, grid = backproject_grid(N, D)
    if grid[0]:
        with on_device(g):
            wrap_triton(_backproject_kernel)[grid](
                g2, inv_norm.to(ct).contiguous(), out, seed & 0xFFFFFFFF, N, D, L, nm, BM=_BM, BL=_BL,
                BK=_BK, ACC=tl.float64 if ct == torch.float64 else tl.float32)
    return out.to(g.dtype)


register_triton_autograd("fastkd_triton::sliced_project", sys.modules[__name__])
