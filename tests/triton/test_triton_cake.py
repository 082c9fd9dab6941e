"""Triton backends of cross_class_contrastive and langevin_step_. Without a GPU they run in
Triton's CPU interpreter, in their own invocation:

    TRITON_INTERPRET=1 python -m pytest tests/triton
"""
import math

import pytest
import torch

from fastkd.ops import cross_class_contrastive, langevin_step_, langevin_step_reference, tv_loss

from triton_env import DEVICE, requires_triton

pytestmark = requires_triton


def naive(p, y, g=None, reduction="sum"):
    p = p.double()
    d = (p[:, None, :] - p[None, :, :]).square().sum(-1)
    mask = y[:, None] != y[None, :]
    if g is not None:
        mask &= g[:, None] == g[None, :]
    s = (d * mask).sum()
    return s / mask.sum().clamp_min(1) if reduction == "mean" else s


@pytest.mark.parametrize("reduction", ["sum", "mean"])
@pytest.mark.parametrize("n,k,ncls,ngrp", [(2, 3, 2, None), (37, 5, 4, 3), (50, 70, 6, None), (9, 2, 1, None)])
def test_contrastive_matches_naive(n, k, ncls, ngrp, reduction):
    p = torch.randn(n, k, dtype=torch.float64, device=DEVICE)
    y = torch.randint(0, ncls, (n,), device=DEVICE)
    g = torch.randint(0, ngrp, (n,), device=DEVICE) if ngrp else None
    p1 = p.clone().requires_grad_(True)
    p2 = p.clone().requires_grad_(True)
    got = cross_class_contrastive(p1, y, groups=g, reduction=reduction, backend="triton")
    want = naive(p2, y, g, reduction)
    got.backward()
    want.backward()
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-9)
    torch.testing.assert_close(p1.grad, p2.grad, rtol=1e-9, atol=1e-9)


def test_contrastive_fp32_centred():
    p = torch.randn(512, 10, device=DEVICE) + 30.0
    y = torch.randint(0, 10, (512,), device=DEVICE)
    got = cross_class_contrastive(p, y, backend="triton")
    want = naive(p, y)
    assert abs(got.double().item() - want.item()) / want.item() < 1e-5


def test_contrastive_gradcheck():
    p = torch.randn(8, 3, dtype=torch.float64, device=DEVICE, requires_grad=True)
    y = torch.tensor([0, 1, 2, 0, 1, 1, 2, 0], device=DEVICE)
    assert torch.autograd.gradcheck(lambda t: cross_class_contrastive(t, y, reduction="mean", backend="triton"), (p,))


@pytest.mark.parametrize("shape,tv_weight,tv_p,per_sample", [
    ((2, 3, 9, 7), 0.0, 1, False), ((2, 3, 9, 7), 2.0, 1, True), ((3, 1, 40, 5), 2.0, 2, False),
    ((3, 1, 40, 5), 0.0, 1, True), ((1, 2, 1, 6), 2.0, 2, True)])
def test_langevin_matches_reference(shape, tv_weight, tv_p, per_sample):
    x = torch.randn(shape, device=DEVICE)
    g = torch.randn(shape, device=DEVICE)
    lr = torch.rand(shape[0], device=DEVICE) * 0.1 + 0.01 if per_sample else 0.05
    want = langevin_step_reference(x, g, lr, None, (-1.0, 1.2), tv_weight, tv_p, seed=77)
    got = x.clone()
    langevin_step_(got, g, lr, clamp=(-1.0, 1.2), tv_weight=tv_weight, tv_p=tv_p, seed=77, backend="triton")
    torch.testing.assert_close(got, want, rtol=1e-5, atol=2e-5)


@pytest.mark.parametrize("tv_p", [1, 2])
def test_langevin_fused_tv_gradient(tv_p):
    x = torch.randn(2, 3, 11, 13, dtype=torch.float64, device=DEVICE)
    xr = x.clone().requires_grad_(True)
    tv_loss(xr, p=tv_p, backend="torch").backward()
    out = x.clone()
    langevin_step_(out, torch.zeros_like(x), 1.0, noise_std=0.0, tv_weight=3.0, tv_p=tv_p, backend="triton")
    torch.testing.assert_close((x - out) / 3.0, xr.grad, rtol=1e-9, atol=1e-12)


def test_langevin_noise_statistics_and_seeds():
    n = 1 << 16  # the 1M-draw check runs on the compiled backends; the interpreter is slow
    x = torch.zeros(2, n // 2, device=DEVICE)
    langevin_step_(x, torch.zeros_like(x), 0.5, seed=2024, backend="triton")
    z = x.double().flatten()
    assert abs(z.mean().item()) < 5 / math.sqrt(n)
    assert abs(z.var().item() - 1.0) < 5 * math.sqrt(2.0 / (n - 1))
    a = torch.zeros(2, 64, device=DEVICE)
    b = torch.zeros(2, 64, device=DEVICE)
    c = torch.zeros(2, 64, device=DEVICE)
    for t, s in ((a, 5), (b, 5), (c, 6)):
        langevin_step_(t, torch.zeros_like(t), 0.1, seed=s, backend="triton")
    assert torch.equal(a, b) and not torch.allclose(a, c)


def test_langevin_uniform_one_gives_zero_normal():
    # seeds/elements whose Box-Muller radius uniform is exactly 1 (see tests/test_langevin.py)
    from fastkd.ops import philox_normal

    for seed, e in [(4696, 376), (5947, 166)]:
        x = torch.zeros(2, 256, device=DEVICE)
        langevin_step_(x, torch.zeros_like(x), 0.5, noise_std=1.0, seed=seed, backend="triton")
        flat = x.flatten()
        assert torch.isfinite(flat).all() and flat.abs().max().item() < 7
        assert abs(flat[e].item()) < 1e-5 and abs(flat[e + 1].item()) < 1e-5
        torch.testing.assert_close(flat.cpu(), philox_normal(512, seed), rtol=0, atol=5e-5)
