"""Langevin step in Triton, in place (see fastkd.ops.langevin).

Noise is generated in the kernel with the same Philox4x32-10 + Box-Muller stream as the
other backends. Without the TV prior each program owns BLOCK_J Philox blocks (4*BLOCK_J
consecutive elements). With it each program walks one (sample, channel) plane in tiles
of rows; the old values of the row above a tile are carried from the previous tile and
a barrier separates the tile's reads from its writes, so updating in place is safe. When
W is a multiple of 4 the four elements of a Philox block lie in one row, and a tile draws
each block once (one Philox and two Box-Muller per 4 elements); otherwise each element
draws its own block and keeps one of its four normals.

The float arguments (lr, noise_std, the clamp bounds, the TV weight) arrive as float64 bit
patterns (see ._launch) so that a float64 step is exact.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._common import compute_dtype, wrap_triton
from ._launch import f64_bits, from_bits, grid_1d, on_device


@triton.jit
def _philox(c0, c1, k0, k1):
    x0 = c0
    x1 = c1
    x2 = tl.zeros_like(c0)
    x3 = tl.zeros_like(c0)
    k0 = tl.zeros_like(c0) + k0.to(tl.uint32)
    k1 = tl.zeros_like(c0) + k1.to(tl.uint32)
    w0 = tl.full(c0.shape, 0x9E3779B9, tl.uint32)
    w1 = tl.full(c0.shape, 0xBB67AE85, tl.uint32)
    for _ in tl.static_range(10):
        m0 = tl.full(x0.shape, 0xD2511F53, tl.uint32)
        m1 = tl.full(x0.shape, 0xCD9E8D57, tl.uint32)
        h0 = tl.umulhi(m0, x0)
        l0 = m0 * x0
        h1 = tl.umulhi(m1, x2)
        l1 = m1 * x2
        y0 = h1 ^ x1 ^ k0
        y2 = h0 ^ x3 ^ k1
        x0 = y0
        x1 = l1
        x2 = y2
        x3 = l0
        k0 = k0 + w0
        k1 = k1 + w1
    return x0, x1, x2, x3


@triton.jit
def _box_muller(ua, ub):
    a = ((ua >> 8) + 1).to(tl.float32) * 5.9604644775390625e-8
    b = (ub >> 8).to(tl.float32) * 5.9604644775390625e-8
    r = tl.sqrt(-2.0 * tl.log(a))
    th = 6.283185307179586 * b
    return r * tl.cos(th), r * tl.sin(th)


@triton.jit
def _update(x_ptr, g_ptr, e, m, per, lr_ptr, lr, sd_ptr, sd, lo, hi, z,
            LR_T: tl.constexpr, SD_T: tl.constexpr, NOISE: tl.constexpr, CLAMP: tl.constexpr,
            ACC: tl.constexpr):
    n = e // per
    if LR_T:
        lrv = tl.load(lr_ptr + n, mask=m, other=0.0).to(ACC)
    else:
        lrv = lr
    v = tl.load(x_ptr + e, mask=m, other=0.0).to(ACC) - lrv * tl.load(g_ptr + e, mask=m, other=0.0).to(ACC)
    if NOISE:
        if SD_T:
            sdv = tl.load(sd_ptr + n, mask=m, other=0.0).to(ACC)
        else:
            sdv = sd
        v = v + sdv * z.to(ACC)
    if CLAMP:
        v = tl.minimum(tl.maximum(v, lo), hi)
    tl.store(x_ptr + e, v.to(x_ptr.dtype.element_ty), mask=m)


# k0, k1 (the seed's 32-bit halves) and the float bit patterns are data, not sizes: never
# specialised, so a value equal to 1 stays a runtime integer (specialised, it would be a
# compile-time Python int, which cannot be converted with .to()).
_DATA = ["lr_b", "sd_b", "lo_b", "hi_b", "k0", "k1"]


@triton.jit(do_not_specialize=_DATA)
def _step_kernel(x_ptr, g_ptr, numel, per, lr_ptr, lr_b, sd_ptr, sd_b, lo_b, hi_b, k0, k1,
                 LR_T: tl.constexpr, SD_T: tl.constexpr, NOISE: tl.constexpr, CLAMP: tl.constexpr,
                 ACC: tl.constexpr, BLOCK_J: tl.constexpr):
    lr = from_bits(lr_b, ACC)
    sd = from_bits(sd_b, ACC)
    lo = from_bits(lo_b, ACC)
    hi = from_bits(hi_b, ACC)
    j = tl.program_id(0).to(tl.int64) * BLOCK_J + tl.arange(0, BLOCK_J)
    if NOISE:
        c0 = (j & 0xFFFFFFFF).to(tl.uint32)
        c1 = (j >> 32).to(tl.uint32)
        u0, u1, u2, u3 = _philox(c0, c1, k0, k1)
        z0, z1 = _box_muller(u0, u1)
        z2, z3 = _box_muller(u2, u3)
    else:
        z0 = tl.zeros([BLOCK_J], tl.float32)
        z1 = z0
        z2 = z0
        z3 = z0
    e = 4 * j
    _update(x_ptr, g_ptr, e, e < numel, per, lr_ptr, lr, sd_ptr, sd, lo, hi, z0, LR_T, SD_T, NOISE, CLAMP, ACC)
    _update(x_ptr, g_ptr, e + 1, e + 1 < numel, per, lr_ptr, lr, sd_ptr, sd, lo, hi, z1,
            LR_T, SD_T, NOISE, CLAMP, ACC)
    _update(x_ptr, g_ptr, e + 2, e + 2 < numel, per, lr_ptr, lr, sd_ptr, sd, lo, hi, z2,
            LR_T, SD_T, NOISE, CLAMP, ACC)
    _update(x_ptr, g_ptr, e + 3, e + 3 < numel, per, lr_ptr, lr, sd_ptr, sd, lo, hi, z3,
            LR_T, SD_T, NOISE, CLAMP, ACC)


@triton.jit
def _tvg(d, P: tl.constexpr):
    if P == 1:
        return (d > 0).to(d.dtype) - (d < 0).to(d.dtype)
    else:
        return 2.0 * d


# The TV prior's gradient is tv_weight * (sum of sign / 2 d terms) / terms: tvw_b holds
# tv_weight's bits, terms the number of difference terms of the batch.
@triton.jit(do_not_specialize=_DATA + ["tvw_b", "terms"])
def _step_tv_kernel(x_ptr, g_ptr, C, H, W, lr_ptr, lr_b, sd_ptr, sd_b, lo_b, hi_b, tvw_b, terms, k0, k1,
                    LR_T: tl.constexpr, SD_T: tl.constexpr, NOISE: tl.constexpr, CLAMP: tl.constexpr,
                    P: tl.constexpr, ACC: tl.constexpr, R: tl.constexpr, BW: tl.constexpr,
                    QUAD: tl.constexpr):
    lr = from_bits(lr_b, ACC)
    sd = from_bits(sd_b, ACC)
    lo = from_bits(lo_b, ACC)
    hi = from_bits(hi_b, ACC)
    tvs = from_bits(tvw_b, ACC) / terms.to(tl.int64).to(ACC)
    plane = tl.program_id(0).to(tl.int64)
    n = plane // C
    base = plane * H * W
    if LR_T:
        lrv = tl.load(lr_ptr + n).to(ACC)
    else:
        lrv = lr
    if SD_T:
        sdv = tl.load(sd_ptr + n).to(ACC)
    else:
        sdv = sd
    cols = tl.arange(0, BW)
    cm = cols < W
    prev = tl.zeros([BW], ACC)
    for h0 in range(0, H, R):
        rows = h0 + tl.arange(0, R)
        rm = rows < H
        m = rm[:, None] & cm[None, :]
        off = rows[:, None].to(tl.int64) * W + cols[None, :]
        ptr = x_ptr + base + off
        c = tl.load(ptr, mask=m, other=0.0).to(ACC)
        mr = m & (cols < W - 1)[None, :]
        ml = m & (cols > 0)[None, :]
        md = m & (rows < H - 1)[:, None]
        mu = m & (rows > h0)[:, None]
        right = tl.load(ptr + 1, mask=mr, other=0.0).to(ACC)
        left = tl.load(ptr - 1, mask=ml, other=0.0).to(ACC)
        down = tl.load(ptr + W, mask=md, other=0.0).to(ACC)
        up = tl.load(ptr - W, mask=mu, other=0.0).to(ACC)
        up = tl.where((rows == h0)[:, None], prev[None, :], up)
        has_up = m & (rows > 0)[:, None]
        zero = tl.zeros([R, BW], ACC)
        gt = tl.where(ml, _tvg(c - left, P), zero) - tl.where(mr, _tvg(right - c, P), zero) \
            + tl.where(has_up, _tvg(c - up, P), zero) - tl.where(md, _tvg(down - c, P), zero)
        v = c - lrv * (tl.load(g_ptr + base + off, mask=m, other=0.0).to(ACC) + tvs * gt)
        if NOISE:
            if QUAD:
                # W % 4 == 0: element (row, 4q + i) is lane i of block (base + row W) / 4 + q
                jq = (base + rows[:, None].to(tl.int64) * W) // 4 + tl.arange(0, BW // 4)[None, :]
                u0, u1, u2, u3 = _philox((jq & 0xFFFFFFFF).to(tl.uint32), (jq >> 32).to(tl.uint32), k0, k1)
                z0, z1 = _box_muller(u0, u1)
                z2, z3 = _box_muller(u2, u3)
                # (R, BW/4, 2, 2) with [.., k, i] = z_{2k+i}, row-major: the lanes in order
                z = tl.reshape(tl.join(tl.join(z0, z2), tl.join(z1, z3)), [R, BW])
            else:
                e = base + off
                j = e // 4
                lane = e % 4
                u0, u1, u2, u3 = _philox((j & 0xFFFFFFFF).to(tl.uint32), (j >> 32).to(tl.uint32), k0, k1)
                zc, zs = _box_muller(tl.where(lane < 2, u0, u2), tl.where(lane < 2, u1, u3))
                z = tl.where((lane % 2) == 0, zc, zs)
            v = v + sdv * z.to(ACC)
        if CLAMP:
            v = tl.minimum(tl.maximum(v, lo), hi)
        prev = tl.sum(tl.where((rows == h0 + R - 1)[:, None], c, zero), axis=0)
        tl.debug_barrier()
        tl.store(ptr, v.to(x_ptr.dtype.element_ty), mask=m)
        tl.debug_barrier()


@torch.library.triton_op("fastkd_triton::langevin_step_", mutates_args={"x"})
def langevin_step_(x: torch.Tensor, grad: torch.Tensor, lr_t: torch.Tensor | None, lr: float,
                   std_t: torch.Tensor | None, noise_std: float, do_clamp: bool, lo: float, hi: float,
                   tv_weight: float, tv_p: int, seed: int) -> None:
    if x.numel() == 0:
        return
    grad = grad.contiguous()
    N = x.shape[0]
    per = x.numel() // N
    noise = std_t is not None or noise_std != 0.0
    cd = compute_dtype(x.dtype)
    acc = tl.float64 if cd == torch.float64 else tl.float32
    # per-sample rates in the accumulation dtype, as the reference applies them. An unused
    # pointer gets grad, never x: where torch cannot analyse a kernel it assumes that every
    # tensor argument is written, and x passed under two names would then be written back
    # from the copy that the kernel did not touch.
    lr_buf = lr_t.to(cd).contiguous() if lr_t is not None else grad
    sd_buf = std_t.to(cd).contiguous() if std_t is not None else grad
    k0, k1 = seed & 0xFFFFFFFF, (seed >> 32) & 0xFFFFFFFF
    lr_b, sd_b = f64_bits(lr), f64_bits(noise_std)
    lo_b, hi_b = (f64_bits(lo), f64_bits(hi)) if do_clamp else (0, 0)
    wt = wrap_triton
    if tv_weight == 0.0:
        BJ = 256
        grid = grid_1d(triton.cdiv(triton.cdiv(x.numel(), 4), BJ), "langevin_step_")
        with on_device(x):
            wt(_step_kernel)[grid](x, grad, x.numel(), per, lr_buf, lr_b, sd_buf, sd_b, lo_b, hi_b, k0, k1,
                                   LR_T=lr_t is not None, SD_T=std_t is not None, NOISE=noise, CLAMP=do_clamp,
                                   ACC=acc, BLOCK_J=BJ)
        return
    _, C, H, W = x.shape
    terms = N * C * ((H - 1) * W + H * (W - 1))
    BW = triton.next_power_of_2(W)
    R = max(1, min(triton.next_power_of_2(H), 2048 // BW))
    with on_device(x):
        wt(_step_tv_kernel)[grid_1d(N * C, "langevin_step_")](
            x, grad, C, H, W, lr_buf, lr_b, sd_buf, sd_b, lo_b, hi_b, f64_bits(tv_weight), terms, k0, k1,
            LR_T=lr_t is not None, SD_T=std_t is not None, NOISE=noise, CLAMP=do_clamp, P=tv_p, ACC=acc,
            R=R, BW=BW, QUAD=W % 4 == 0)
