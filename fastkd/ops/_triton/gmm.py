"""Two-component 1-D Gaussian mixture in one Triton program (see fastkd.ops.gmm).

The whole fit -- 2-means initialisation, EM with a convergence mask, final E-step -- runs
in a single program holding the N scores in registers: one kernel launch, no host sync.
Arithmetic is fp32 (the reference is fp64): posteriors agree to ~1e-5.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ._launch import on_device

_LOG2PI = math.log(2.0 * math.pi)
_EPS = 10 * float(torch.finfo(torch.float64).eps)


@triton.jit
def _m_step(x, r0, r1, reg, EPS: tl.constexpr):
    n0 = tl.sum(r0, axis=0) + EPS
    n1 = tl.sum(r1, axis=0) + EPS
    m0 = tl.sum(r0 * x, axis=0) / n0
    m1 = tl.sum(r1 * x, axis=0) / n1
    d0 = x - m0
    d1 = x - m1
    v0 = tl.sum(r0 * d0 * d0, axis=0) / n0 + reg
    v1 = tl.sum(r1 * d1 * d1, axis=0) / n1 + reg
    tot = n0 + n1
    return n0 / tot, n1 / tot, m0, m1, v0, v1


@triton.jit
def _e_step(x, w, n, w0, w1, m0, m1, v0, v1, LOG2PI: tl.constexpr):
    d0 = x - m0
    d1 = x - m1
    lp0 = -0.5 * (LOG2PI + tl.log(v0) + d0 * d0 / v0) + tl.log(w0)
    lp1 = -0.5 * (LOG2PI + tl.log(v1) + d1 * d1 / v1) + tl.log(w1)
    mx = tl.maximum(lp0, lp1)
    lnorm = mx + tl.log(tl.exp(lp0 - mx) + tl.exp(lp1 - mx))
    lb = tl.sum(lnorm * w, axis=0) / tl.maximum(n, 1.0)
    return lb, tl.exp(lp0 - lnorm) * w, tl.exp(lp1 - lnorm) * w


@triton.jit
def _gmm_kernel(x_ptr, valid_ptr, prob_ptr, par_ptr, N, max_iter, tol, reg, KM_ITERS,
                LOG2PI: tl.constexpr, EPS: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    inb = offs < N
    ok = (tl.load(valid_ptr + offs, mask=inb, other=0) != 0) & inb
    x = tl.load(x_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    w = tl.where(ok, 1.0, 0.0)
    x = tl.where(ok, x, 0.0)
    n = tl.sum(w, axis=0)
    lo = tl.min(tl.where(ok, x, float("inf")), axis=0)
    hi = tl.max(tl.where(ok, x, float("-inf")), axis=0)
    degenerate = (n < 2.0) | (hi <= lo)
    c0 = tl.where(degenerate, 0.0, lo)
    c1 = tl.where(degenerate, 1.0, hi)
    for _ in range(0, KM_ITERS):
        t = 0.5 * (c0 + c1)
        r1 = tl.where(x > t, w, 0.0)
        r0 = w - r1
        k0 = tl.sum(r0, axis=0)
        k1 = tl.sum(r1, axis=0)
        c0 = tl.where(k0 > 0, tl.sum(r0 * x, axis=0) / tl.maximum(k0, 1.0), c0)
        c1 = tl.where(k1 > 0, tl.sum(r1 * x, axis=0) / tl.maximum(k1, 1.0), c1)
    t = 0.5 * (c0 + c1)
    r1 = tl.where(x > t, w, 0.0)
    r0 = w - r1
    w0, w1, m0, m1, v0, v1 = _m_step(x, r0, r1, reg, EPS)
    prev = n * 0.0 - float("inf")
    done = n < -1.0
    n_iter = n * 0.0
    for _ in range(0, max_iter):
        lb, r0, r1 = _e_step(x, w, n, w0, w1, m0, m1, v0, v1, LOG2PI)
        nw0, nw1, nm0, nm1, nv0, nv1 = _m_step(x, r0, r1, reg, EPS)
        act = done == 0
        w0 = tl.where(act, nw0, w0)
        w1 = tl.where(act, nw1, w1)
        m0 = tl.where(act, nm0, m0)
        m1 = tl.where(act, nm1, m1)
        v0 = tl.where(act, nv0, v0)
        v1 = tl.where(act, nv1, v1)
        n_iter = n_iter + tl.where(act, 1.0, 0.0)
        done = done | (act & (tl.abs(lb - prev) < tol))
        prev = tl.where(act, lb, prev)
    lb, r0, r1 = _e_step(x, w, n, w0, w1, m0, m1, v0, v1, LOG2PI)
    low0 = m0 <= m1
    prob = tl.where(low0, r0, r1)
    prob = tl.where(degenerate, w, prob)
    tl.store(prob_ptr + offs, prob, mask=inb)
    tl.store(par_ptr + 0, tl.where(low0, m0, m1))
    tl.store(par_ptr + 1, tl.where(low0, m1, m0))
    tl.store(par_ptr + 2, tl.where(low0, v0, v1))
    tl.store(par_ptr + 3, tl.where(low0, v1, v0))
    tl.store(par_ptr + 4, tl.where(low0, w0, w1))
    tl.store(par_ptr + 5, tl.where(low0, w1, w0))
    tl.store(par_ptr + 6, n_iter)
    tl.store(par_ptr + 7, tl.where(done, 1.0, 0.0))
    tl.store(par_ptr + 8, tl.where(degenerate, 1.0, 0.0))


def gmm_fit_triton(scores: torch.Tensor, valid: torch.Tensor, max_iter: int, tol: float, reg_covar: float,
                   kmeans_iter: int = 16):
    N = scores.shape[0]
    BLOCK = max(16, triton.next_power_of_2(N))
    x = scores.detach().contiguous()
    v = valid.contiguous().to(torch.uint8)
    prob = torch.empty(N, dtype=torch.float32, device=scores.device)
    par = torch.empty(9, dtype=torch.float32, device=scores.device)
    nw = 4 if BLOCK <= 2048 else (8 if BLOCK <= 8192 else 16)
    with on_device(x):
        _gmm_kernel[(1,)](x, v, prob, par, N, max_iter, tol, reg_covar, kmeans_iter,
                          LOG2PI=_LOG2PI, EPS=_EPS, BLOCK=BLOCK, num_warps=nw)
    p64 = par.to(torch.float64)
    # the fields of fastkd.ops.GMMFit, in order (the op module builds it)
    return (prob.to(torch.float64), p64[0:2], p64[2:4], p64[4:6], par[6].to(torch.int64),
            par[7] > 0.5, par[8] > 0.5)
