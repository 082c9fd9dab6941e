"""Every CUDA kernel of csrc/cuda, run in the host emulation, against the PyTorch reference.

The emulated kernels (the CUDA sources built by emu_build.py, host code included) replace
the C++ CPU kernels of the ``fastkd::`` ops for the duration of this module, so the public
ops with ``backend="cpp"`` on CPU tensors run the CUDA code, and the checks of the other
backends' tests apply unchanged. The emulated GPU has 4 multiprocessors (host code sizes
grids by it); the shapes give partial warps, partial blocks and multi-block reductions.
Run with: python -m pytest -q tests/cuda_emu/emu_kernels.py (see README.md here).
"""
import math

import numpy as np
import pytest
import torch

import emu_build
import test_bn_stats_loss as T_bn
import test_cross_class_contrastive as T_ccc
import test_image_distance as T_id
import test_tv_loss as T_tv
from fastkd.ops import langevin_step_, langevin_step_reference, pairwise_sqdist, tv_loss
from fastkd.ops.ot import pairwise_sqdist_reference, sliced_directions

OPS = ["tv_loss_fwd", "image_distance_fwd", "bn_stats_fwd", "bn_stats_bwd", "cross_class_contrastive_fwd",
       "langevin_step_", "pairwise_sqdist_fwd", "sliced_project", "sliced_backproject"]
CALLS = {op: 0 for op in OPS}


def _forward(op):
    emu = getattr(torch.ops.fastkd_emu, op)

    def kernel(*args):
        CALLS[op] += 1
        return emu(*args)
    return kernel


@pytest.fixture(scope="module", autouse=True)
def emulated_cuda_kernels():
    emu_build.library()
    torch.ops.fastkd_emu.set_sm_count(4)
    lib = torch.library.Library("fastkd", "IMPL")
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "overriding a previously registered kernel"
        for op in OPS:
            lib.impl(op, _forward(op), "CPU")
    yield
    lib._destroy()  # the C++ CPU kernels are back


# ----------------------------------------------------------------------------- tv_loss
@pytest.mark.parametrize("p,diagonal,reduction", [(1, False, "mean"), (2, True, "none"), (1, True, "sum")])
@pytest.mark.parametrize("shape", [(1, 1, 2, 2), (3, 5, 7, 11), (2, 2, 9, 1), (2, 3, 33, 65)])
def test_tv_loss(shape, p, diagonal, reduction):
    T_tv._check_backend("cpp", "cpu", shape, p, diagonal, reduction)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_tv_loss_low_precision(dtype):
    x = torch.randn(2, 3, 20, 70).to(dtype)
    got = tv_loss(x, p=2, diagonal=True, backend="cpp")
    want = T_tv.tv_loss_reference(x.double(), 2, True, "mean")
    torch.testing.assert_close(got.double(), want, rtol=2e-3 if dtype == torch.float16 else 1e-5, atol=0)


# ----------------------------------------------------------------------------- image_distance
@pytest.mark.parametrize("p,reduction", [(1, "mean"), (2, "sum"), (1, "none")])
@pytest.mark.parametrize("shape", [(2, 7), (3, 2, 5, 5), (2, 5000)])
def test_image_distance(shape, p, reduction):
    T_id._check("cpp", "cpu", shape, p, reduction)


# ----------------------------------------------------------------------------- bn_stats
@pytest.mark.parametrize("shape", [(4, 3), (2, 3, 4, 5), (5, 3, 31, 33)])
def test_bn_stats(shape):
    T_bn._check_backend("cpp", "cpu", shape, offset=3.0)


def test_bn_stats_fp32_channels_last():
    T_bn._check_backend("cpp", "cpu", (4, 5, 9, 7), dtype=torch.float32,
                        make=lambda x: x.contiguous(memory_format=torch.channels_last))


# ----------------------------------------------------------------------------- contrastive
@pytest.mark.parametrize("reduction", ["sum", "mean"])
@pytest.mark.parametrize("n,k,ncls,ngrp", [(2, 3, 2, None), (40, 10, 10, 4), (64, 7, 100, None),
                                           (300, 3, 5, 7)])
def test_cross_class_contrastive(n, k, ncls, ngrp, reduction):
    T_ccc._check("cpp", n, k, ncls, ngrp, reduction)


# ----------------------------------------------------------------------------- langevin
def _xg(shape, dtype=torch.float32):
    return torch.randn(shape, dtype=dtype), torch.randn(shape, dtype=dtype)


@pytest.mark.parametrize("tv_weight", [0.0, 3.0])
@pytest.mark.parametrize("per_sample", [False, True])
@pytest.mark.parametrize("clamp", [None, (-0.5, 0.7)])
@pytest.mark.parametrize("shape", [(3, 2, 10, 9), (2, 1, 20, 300)])
def test_langevin_step(shape, tv_weight, per_sample, clamp):
    # (2, 1, 20, 300): tiles of 6 rows (the last one partial) in the TV kernel
    x, g = _xg(shape)
    lr = torch.tensor([0.01, 0.2, 0.05][: shape[0]]) if per_sample else 0.03
    want = langevin_step_reference(x, g, lr, None, clamp, tv_weight, 2, seed=42)
    got = x.clone()
    langevin_step_(got, g, lr, clamp=clamp, tv_weight=tv_weight, tv_p=2, seed=42, backend="cpp")
    torch.testing.assert_close(got, want, rtol=1e-5, atol=2e-5)


@pytest.mark.parametrize("tv_p", [1, 2])
@pytest.mark.parametrize("shape", [(2, 3, 9, 7), (2, 1, 6, 1), (1, 2, 33, 2100 // 33 + 40)])
def test_langevin_tv_gradient_equals_autograd(tv_p, shape):
    x = torch.randn(shape, dtype=torch.float64)
    xr = x.clone().requires_grad_(True)
    tv_loss(xr, p=tv_p, reduction="mean", backend="torch").backward()
    out = x.clone()
    langevin_step_(out, torch.zeros_like(x), 1.0, noise_std=0.0, tv_weight=2.5, tv_p=tv_p, backend="cpp")
    torch.testing.assert_close((x - out) / 2.5, xr.grad, rtol=1e-9, atol=1e-12)


def test_langevin_tv_width_limit_is_the_one_dispatch_knows():
    from fastkd.ops.langevin import CUDA_TV_MAX_WIDTH as W

    x, g = _xg((1, 1, 2, W))
    want = langevin_step_reference(x, g, 0.1, 0.0, None, 1.0, 1, seed=0)
    langevin_step_(x, g, 0.1, noise_std=0.0, tv_weight=1.0, backend="cpp")
    torch.testing.assert_close(x, want, rtol=1e-5, atol=2e-5)
    x, g = _xg((1, 1, 2, W + 1))
    with pytest.raises(RuntimeError, match=f"supports W <= {W}"):
        langevin_step_(x, g, 0.1, noise_std=0.0, tv_weight=1.0, backend="cpp")


def test_langevin_noise_many_blocks():
    # 3 x 5001 elements: 15 blocks of 256 threads, a Philox block straddling two samples
    x = torch.zeros(3, 5001)
    sd = torch.tensor([1.0, 0.5, 2.0])
    want = langevin_step_reference(x, torch.zeros_like(x), 0.1, sd, None, 0.0, 1, seed=2**40 + 3)
    langevin_step_(x, torch.zeros_like(x), 0.1, noise_std=sd, seed=2**40 + 3, backend="cpp")
    torch.testing.assert_close(x, want, rtol=1e-5, atol=2e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_langevin_dtypes(dtype):
    x, g = _xg((2, 3, 7, 6), dtype)
    want = langevin_step_reference(x, g, 0.05, None, (-1.0, 1.0), 0.5, 1, seed=3)
    got = x.clone()
    langevin_step_(got, g, 0.05, clamp=(-1.0, 1.0), tv_weight=0.5, seed=3, backend="cpp")
    tol = {torch.float16: 2e-3, torch.bfloat16: 2e-2, torch.float64: 1e-5}[dtype]
    torch.testing.assert_close(got, want, rtol=tol, atol=tol)


# ----------------------------------------------------------------------------- pairwise_sqdist
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("n,m,d", [(5, 4, 3), (33, 9, 70), (1, 1, 1)])
def test_pairwise_sqdist(n, m, d, dtype):
    a = torch.randn(n, d, dtype=dtype, requires_grad=True)
    b = torch.randn(m, d, dtype=dtype, requires_grad=True)
    ar, br = a.detach().double().requires_grad_(True), b.detach().double().requires_grad_(True)
    got = pairwise_sqdist(a, b, backend="cpp")
    want = pairwise_sqdist_reference(ar, br)
    w = torch.randn(n, m, dtype=torch.float64)
    (got * w.to(dtype)).sum().backward()
    (want * w).sum().backward()
    tol = dict(rtol=1e-9, atol=1e-9) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got.double(), want.detach(), **tol)
    torch.testing.assert_close(a.grad.double(), ar.grad, **tol)
    torch.testing.assert_close(b.grad.double(), br.grad, **tol)


def test_pairwise_sqdist_cancellation_recomputed():
    # rows 1e-3 apart at norm ~100: the Gram form cancels, the warp recompute must take over
    a = torch.randn(6, 100) + 100.0
    b = a[:4] + 1e-3 * torch.randn(4, 100)
    got = pairwise_sqdist(a, b, backend="cpp").double()
    want = pairwise_sqdist_reference(a.double(), b.double())
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


# ----------------------------------------------------------------------------- sliced projections
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("n,d,L", [(5, 3000, 19), (9, 33, 9), (1, 1, 1)])
def test_sliced_projections(n, d, L, dtype):
    x = torch.randn(n, d, dtype=dtype)
    theta = sliced_directions(d, L, 12345, dtype=torch.float64)
    proj, inv = torch.ops.fastkd.sliced_project(x, L, 12345)
    torch.testing.assert_close(proj.double(), x.double() @ theta, rtol=1e-5, atol=1e-5)
    g = torch.randn(n, L, dtype=dtype)
    back = torch.ops.fastkd.sliced_backproject(g, inv, d, 12345)
    torch.testing.assert_close(back.double(), g.double() @ theta.T, rtol=1e-5, atol=1e-5)


def test_sliced_zero_sizes():
    # no 0-block grid is launched (CUDA rejects one): N = 0 still gives the norms, D = 0 or
    # N = 0 back-projects to an empty result
    proj, inv = torch.ops.fastkd.sliced_project(torch.empty(0, 50), 9, 4)
    assert proj.shape == (0, 9)
    torch.testing.assert_close(inv, torch.ops.fastkd.sliced_project(torch.randn(1, 50), 9, 4)[1])
    assert torch.ops.fastkd.sliced_backproject(torch.empty(0, 9), inv, 50, 4).shape == (0, 50)
    assert torch.ops.fastkd.sliced_backproject(torch.randn(3, 9), inv, 0, 4).shape == (3, 0)


def test_sliced_directions_generated_in_kernel_match_reference():
    # rows of the identity project onto the directions themselves (9 rows: two row tiles)
    D, L = 40, 10
    proj, inv = torch.ops.fastkd.sliced_project(torch.eye(D)[:9], L, 7)
    theta = sliced_directions(D, L, 7)[:9]
    torch.testing.assert_close(proj, theta, rtol=0, atol=2e-6)
    assert np.isfinite(inv.numpy()).all() and math.isclose(float(inv[0]), 1 / math.sqrt(D), rel_tol=0.5)


# ----------------------------------------------------------------------------- --use_fast_math
@pytest.fixture()
def fast_math():
    """logf errs like nvcc's --use_fast_math approximation (worst case upwards)."""
    torch.ops.fastkd_emu.set_fast_math(True)
    yield
    torch.ops.fastkd_emu.set_fast_math(False)


def test_langevin_noise_finite_and_accurate_under_fast_math(fast_math):
    # seed 2691448: Philox block 1 gives a = 1 - 2^-24 for elements 6 and 7, where an
    # approximate log can come out >= 0 (a NaN radius)
    from fastkd.ops.langevin import _philox_blocks

    seed = 2691448
    u = _philox_blocks(torch.tensor([1]), seed)
    assert int(u[2][0]) >> 8 == 2**24 - 2
    x = torch.zeros(2, 8)
    want = langevin_step_reference(x, torch.zeros_like(x), 0.1, 1.0, (-5.0, 5.0), 0.0, 1, seed=seed)
    langevin_step_(x, torch.zeros_like(x), 0.1, noise_std=1.0, clamp=(-5.0, 5.0), seed=seed, backend="cpp")
    assert torch.isfinite(x).all()
    torch.testing.assert_close(x, want, rtol=1e-5, atol=2e-5)
    y = torch.zeros(1, 1, 2, 8)  # the TV kernel's noise
    want = langevin_step_reference(y, torch.zeros_like(y), 0.1, 1.0, None, 1.0, 1, seed=seed)
    langevin_step_(y, torch.zeros_like(y), 0.1, noise_std=1.0, tv_weight=1.0, seed=seed, backend="cpp")
    torch.testing.assert_close(y, want, rtol=1e-5, atol=2e-5)


def test_sliced_directions_finite_and_accurate_under_fast_math(fast_math):
    # seed 66551: coordinate 63 of direction 0 has u1 = 1 - 2^-24
    D = 64
    rows = [0, 62, 63]
    proj, inv = torch.ops.fastkd.sliced_project(torch.eye(D)[rows], 2, 66551)
    assert torch.isfinite(proj).all() and torch.isfinite(inv).all()
    torch.testing.assert_close(proj, sliced_directions(D, 2, 66551)[rows], rtol=0, atol=2e-6)


def test_every_kernel_ran():  # last in this file: every emulated op was called by the tests above
    assert [op for op in OPS if CALLS[op] == 0] == []
