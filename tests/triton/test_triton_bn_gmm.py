"""Triton backends of bn_stats_loss and gmm_select. On a machine without a GPU these run in
Triton's CPU interpreter, in their own invocation:

    TRITON_INTERPRET=1 python -m pytest tests/triton
"""
import numpy as np
import pytest
import torch

from fastkd.ops import bn_stats_loss, bn_stats_loss_reference, gmm_fit

from triton_env import DEVICE, requires_triton

pytestmark = requires_triton


def _check_bn(shape, dtype=torch.float64, make=None):
    x = torch.randn(shape, dtype=dtype, device=DEVICE) * 1.5 + 0.3
    if make is not None:
        x = make(x)
    sd = torch.float64 if dtype == torch.float64 else torch.float32
    rm = torch.randn(x.shape[1], dtype=sd, device=DEVICE).requires_grad_(True)
    rv = (torch.rand(x.shape[1], dtype=sd, device=DEVICE) + 0.5).requires_grad_(True)
    x = x.detach().requires_grad_(True)
    xr = x.detach().clone().requires_grad_(True)
    rm2, rv2 = rm.detach().clone().requires_grad_(True), rv.detach().clone().requires_grad_(True)
    got = bn_stats_loss(x, rm, rv, backend="triton")
    want = bn_stats_loss_reference(xr, rm2, rv2)
    (3 * got).backward()
    (3 * want).backward()
    tol = dict(rtol=1e-9, atol=1e-10) if dtype == torch.float64 else dict(rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(got, want, **tol)
    torch.testing.assert_close(x.grad, xr.grad, **tol)
    torch.testing.assert_close(rm.grad, rm2.grad, **tol)
    torch.testing.assert_close(rv.grad, rv2.grad, **tol)


@pytest.mark.parametrize("shape", [(1, 1), (7, 3), (2, 3, 1, 5), (3, 2, 8, 8), (2, 5, 17, 9)])
def test_triton_bn_matches_reference(shape):
    _check_bn(shape)


def test_triton_bn_noncontiguous_and_fp32():
    _check_bn((3, 4, 10, 13), make=lambda x: x.contiguous(memory_format=torch.channels_last))
    _check_bn((4, 3, 12, 12), dtype=torch.float32)


def test_triton_bn_opcheck():
    from fastkd.ops._triton import bn_stats  # noqa: F401

    x = torch.randn(2, 3, 5, 6, dtype=torch.float64, device=DEVICE, requires_grad=True)
    rm = torch.zeros(3, dtype=torch.float64, device=DEVICE)
    rv = torch.ones(3, dtype=torch.float64, device=DEVICE)
    utils = ("test_schema", "test_autograd_registration") if DEVICE == "cpu" else \
        ("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")
    torch.library.opcheck(torch.ops.fastkd_triton.bn_stats_fwd.default, (x, rm, rv), test_utils=utils)


def _scores(seed, n, frac):
    rng = np.random.default_rng(seed)
    k = int(n * frac)
    a = np.concatenate([rng.normal(0.15, 0.05, k), rng.normal(0.7, 0.15, n - k)])
    return (a - a.min()) / (a.max() - a.min())


@pytest.mark.parametrize("seed,n,frac", [(0, 64, 0.6), (1, 300, 0.3), (2, 1024, 0.8)])
def test_triton_gmm_matches_reference(seed, n, frac):
    x = torch.tensor(_scores(seed, n, frac), dtype=torch.float32, device=DEVICE)
    ref = gmm_fit(x, backend="torch")
    got = gmm_fit(x, backend="triton")
    torch.testing.assert_close(got.prob_low, ref.prob_low, atol=1e-5, rtol=0)
    torch.testing.assert_close(got.means, ref.means, atol=1e-5, rtol=1e-5)
    assert int(got.n_iter) == int(ref.n_iter) and bool(got.converged) == bool(ref.converged)


def test_triton_gmm_nan_omit_and_degenerate():
    x = torch.tensor([0.1, 0.9, float("nan"), 0.12, 0.85, 0.11], device=DEVICE)
    got = gmm_fit(x, nan_policy="omit", backend="triton")
    ref = gmm_fit(x, nan_policy="omit", backend="torch")
    torch.testing.assert_close(got.prob_low, ref.prob_low, atol=1e-5, rtol=0)
    assert got.prob_low[2] == 0
    d = gmm_fit(torch.full((8,), 0.3, device=DEVICE), backend="triton")
    assert bool(d.degenerate) and bool((d.prob_low == 1).all())
