"""Triton backends of image_distance, pairwise_sqdist and the sliced projections. Without a
GPU these run in Triton's CPU interpreter, in their own invocation:

    TRITON_INTERPRET=1 python -m pytest tests/triton
"""
import pytest
import torch

from fastkd.ops import image_distance, image_distance_reference, pairwise_sqdist, sliced_directions, wasserstein

from triton_env import DEVICE, requires_triton

pytestmark = requires_triton


def cdist2(a, b):
    return torch.cdist(a.flatten(1).double(), b.flatten(1).double()) ** 2


@pytest.mark.parametrize("p,reduction", [(1, "mean"), (1, "none"), (2, "sum"), (2, "mean")])
@pytest.mark.parametrize("shape", [(1, 1), (3, 7), (2, 3, 5, 90)])
def test_image_distance(shape, p, reduction):
    a = torch.randn(shape, dtype=torch.float64, device=DEVICE, requires_grad=True)
    b = torch.randn(shape, dtype=torch.float64, device=DEVICE, requires_grad=True)
    ar, br = a.detach().clone().requires_grad_(True), b.detach().clone().requires_grad_(True)
    got = image_distance(a, b, p=p, reduction=reduction, backend="triton")
    want = image_distance_reference(ar, br, p, reduction)
    w = torch.randn(want.shape, dtype=torch.float64, device=DEVICE)
    (got * w).sum().backward()
    (want * w).sum().backward()
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(a.grad, ar.grad)
    torch.testing.assert_close(b.grad, br.grad)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("n,m,d", [(1, 1, 1), (5, 37, 70), (33, 3, 40)])
def test_pairwise_sqdist(n, m, d, dtype):
    a = torch.randn(n, d, dtype=dtype, device=DEVICE, requires_grad=True)
    b = torch.randn(m, d, dtype=dtype, device=DEVICE, requires_grad=True)
    got = pairwise_sqdist(a, b, backend="triton")
    tol = dict(rtol=1e-9, atol=1e-9) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(got.double(), cdist2(a.detach(), b.detach()), **tol)
    w = torch.rand(n, m, dtype=dtype, device=DEVICE)
    (got * w).sum().backward()
    a64, b64 = a.detach().double().requires_grad_(True), b.detach().double().requires_grad_(True)
    (cdist2(a64, b64) * w.double()).sum().backward()
    torch.testing.assert_close(a.grad.double(), a64.grad, **tol)


def test_pairwise_sqdist_identical_rows_exact_zero():
    x = torch.rand(4, 50, device=DEVICE) * 100 + 50
    d = pairwise_sqdist(x, x, backend="triton")
    assert torch.equal(d.diagonal(), torch.zeros(4, device=DEVICE)) and (d >= 0).all()


@pytest.mark.parametrize("n,L,D", [(3, 5, 70), (17, 16, 130)])
def test_sliced_projections_generated_in_kernel(n, L, D):
    from fastkd.ops._triton import ot as tot  # noqa: F401

    x = torch.randn(n, D, dtype=torch.float64, device=DEVICE)
    proj, inv = torch.ops.fastkd_triton.sliced_project(x, L, 77)
    theta = sliced_directions(D, L, 77, dtype=torch.float64, device=DEVICE)
    torch.testing.assert_close(proj, x @ theta, rtol=1e-5, atol=1e-5)
    g = torch.randn(n, L, dtype=torch.float64, device=DEVICE)
    back = torch.ops.fastkd_triton.sliced_backproject(g, inv, D, 77)
    torch.testing.assert_close(back, g @ theta.T, rtol=1e-5, atol=1e-5)


def test_wasserstein_triton_matches_torch():
    a = torch.randn(6, 2, 3, 4, dtype=torch.float64, device=DEVICE)
    b = torch.randn(6, 2, 3, 4, dtype=torch.float64, device=DEVICE)
    for method in ("exact", "sinkhorn", "sliced"):
        ar = a.clone().requires_grad_(True)
        at_ = a.clone().requires_grad_(True)
        got = wasserstein(ar, b, method=method, seed=4, n_projections=16, blur=0.5, backend="triton")
        want = wasserstein(at_, b, method=method, seed=4, n_projections=16, blur=0.5, backend="torch")
        got.backward()
        want.backward()
        assert got.item() == pytest.approx(want.item(), rel=1e-6)
        torch.testing.assert_close(ar.grad, at_.grad, rtol=1e-5, atol=1e-8)
