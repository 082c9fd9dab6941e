"""fastkd.ops.pairwise_sqdist and fastkd.ops.wasserstein against independent references:
fp64 torch.cdist, scipy.optimize.linear_sum_assignment and POT (ot.emd2, ot.sinkhorn2,
ot.sliced_wasserstein_distance); gradients by finite differences."""
import math

import numpy as np
import ot
import pytest
import torch
from scipy.optimize import linear_sum_assignment

import fastkd
from fastkd.nn import ImageMatchingLoss
from fastkd.ops import (image_distance, linear_assignment, pairwise_sqdist, sliced_directions,
                        wasserstein)

from conftest import HAS_CUDA, cpu_backend_params, gpu_backend_params

BACKENDS = ["torch"] + cpu_backend_params()


def cdist2(a, b):
    return torch.cdist(a.flatten(1).double(), b.flatten(1).double()) ** 2


def unif(n):
    return np.full(n, 1.0 / n)


# --------------------------------------------------------------------------- pairwise_sqdist
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("n,m,shape", [(1, 1, (1,)), (5, 7, (3,)), (9, 4, (3, 5, 6)), (33, 40, (300,))])
def test_sqdist_matches_cdist(backend, n, m, shape):
    a, b = torch.randn(n, *shape, dtype=torch.float64), torch.randn(m, *shape, dtype=torch.float64)
    got = pairwise_sqdist(a, b, backend=backend)
    assert got.shape == (n, m) and got.dtype == torch.float64
    torch.testing.assert_close(got, cdist2(a, b), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("backend", BACKENDS)
def test_sqdist_exact_zero_and_nonnegative(backend):
    x = torch.rand(6, 3, 16, 16) * 50 + 100  # large offset: the GEMM form cancels badly here
    y = torch.cat([x[:3], x[3:] + 1e-3 * torch.randn(3, 3, 16, 16)])
    d = pairwise_sqdist(x, y, backend=backend)
    assert (d >= 0).all()
    assert torch.equal(d.diagonal()[:3], torch.zeros(3))
    ref = cdist2(x, y)
    near = d.diagonal()[3:].double()
    assert ((near - ref.diagonal()[3:]).abs() / ref.diagonal()[3:]).max() < 1e-4


@pytest.mark.parametrize("backend", BACKENDS)
def test_sqdist_accurate_where_cdist_cancels(backend):
    torch.manual_seed(1)
    base = torch.rand(8, 3 * 32 * 32) * 255  # unnormalised pixels
    b = base + 0.5 * torch.randn_like(base)
    ref = cdist2(base, b)
    ours = pairwise_sqdist(base, b, backend=backend).double()
    eager = torch.cdist(base, b).double() ** 2
    err_ours = ((ours - ref).abs() / ref).max().item()
    err_eager = ((eager - ref).abs() / ref).max().item()
    assert err_ours < 1e-4, err_ours
    assert err_ours < err_eager


@pytest.mark.parametrize("backend", BACKENDS)
def test_sqdist_fp32_large_d(backend):
    torch.manual_seed(2)
    D = 150528
    a, b = torch.rand(3, D), torch.rand(4, D)
    b[0] = a[0] + 0.01 * torch.randn(D)
    ours = pairwise_sqdist(a, b, backend=backend).double()
    ref = cdist2(a, b)
    assert ((ours - ref).abs() / ref).max().item() < 1e-4


@pytest.mark.parametrize("backend", BACKENDS)
def test_sqdist_gradcheck(backend):
    a = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    b = torch.randn(3, 6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, y: pairwise_sqdist(x, y, backend=backend), (a, b))


@pytest.mark.parametrize("backend", BACKENDS)
def test_sqdist_fp32_grad(backend):
    a = torch.randn(5, 2, 7, requires_grad=True)
    b = torch.randn(6, 2, 7, requires_grad=True)
    w = torch.rand(5, 6)
    (pairwise_sqdist(a, b, backend=backend) * w).sum().backward()
    a64, b64 = a.detach().double().requires_grad_(True), b.detach().double().requires_grad_(True)
    (cdist2(a64, b64) * w.double()).sum().backward()
    torch.testing.assert_close(a.grad.double(), a64.grad, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(b.grad.double(), b64.grad, rtol=1e-4, atol=1e-4)


def test_sqdist_opcheck():
    if not fastkd.backends()["cpp"].available:
        pytest.skip(fastkd.backends()["cpp"].reason)
    torch.library.opcheck(torch.ops.fastkd.pairwise_sqdist_fwd.default,
                          (torch.randn(4, 5, dtype=torch.float64, requires_grad=True),
                           torch.randn(3, 5, dtype=torch.float64, requires_grad=True)))
    torch.library.opcheck(torch.ops.fastkd.sliced_project.default,
                          (torch.randn(4, 9, dtype=torch.float64, requires_grad=True), 5, 3))
    torch.library.opcheck(torch.ops.fastkd.sliced_backproject.default,
                          (torch.randn(4, 5, dtype=torch.float64), torch.rand(5, dtype=torch.float64), 9, 3))
    torch.library.opcheck(torch.ops.fastkd.linear_assignment.default, (torch.rand(6, 6, dtype=torch.float64),))
    for dt in (torch.float64, torch.float32):  # float64 potentials for both (the fake says so too)
        torch.library.opcheck(torch.ops.fastkd.sinkhorn_log.default,
                              (torch.rand(4, 5, dtype=dt), torch.tensor([1.0, 0.5, 0.25], dtype=torch.float64)))


@pytest.mark.parametrize("backend", BACKENDS)
def test_sqdist_nan_input_gives_nan_not_zero(backend):
    """The never-negative clamp must not turn NaN into 0 (a NaN input silently became an
    all-zero distance matrix): NaN where the PyTorch reference has NaN."""
    a, b = torch.randn(5, 3), torch.randn(4, 3)
    a[1, 2] = float("nan")
    got = pairwise_sqdist(a, b, backend=backend)
    want = pairwise_sqdist(a, b, backend="torch")
    assert torch.isnan(want).any()
    assert torch.equal(torch.isnan(got), torch.isnan(want))


# --------------------------------------------------------------------------- assignment
@pytest.mark.parametrize("solver", ["scipy"] + [pytest.param("cpp", marks=pytest.mark.skipif(
    not fastkd.backends()["cpp"].available, reason="cpp extension not built"))])
@pytest.mark.parametrize("n", [1, 2, 7, 60])
def test_linear_assignment(solver, n):
    c = torch.rand(n, n, dtype=torch.float64)
    col = linear_assignment(c, solver=solver)
    assert sorted(col.tolist()) == list(range(n))
    r, cc = linear_sum_assignment(c.numpy())
    assert c[torch.arange(n), col].sum().item() == pytest.approx(c.numpy()[r, cc].sum(), rel=1e-12)


def test_linear_assignment_ties():
    if not fastkd.backends()["cpp"].available:
        pytest.skip("cpp extension not built")
    c = torch.ones(5, 5, dtype=torch.float64)
    assert sorted(linear_assignment(c, solver="cpp").tolist()) == list(range(5))


@pytest.mark.skipif(not fastkd.backends()["cpp"].available, reason="cpp extension not built")
@pytest.mark.parametrize("kind", ["uniform", "few_values", "rank_one", "large_negative", "constant"])
def test_linear_assignment_cpp_optimal_on_degenerate_costs(kind):
    """Many ties and degenerate matrices (where the search's tie-breaking matters), sizes 1-39,
    against scipy's optimal cost."""
    rng = np.random.default_rng(["uniform", "few_values", "rank_one", "large_negative", "constant"].index(kind))
    for _ in range(120):
        n = int(rng.integers(1, 40))
        c = {"uniform": lambda: rng.random((n, n)),
             "few_values": lambda: rng.integers(0, 4, (n, n)).astype(float),
             "rank_one": lambda: np.outer(rng.random(n), rng.random(n)),
             "large_negative": lambda: -rng.integers(0, 100, (n, n)).astype(float) * 1e6,
             "constant": lambda: np.full((n, n), 3.0)}[kind]()
        col = linear_assignment(torch.from_numpy(c), solver="cpp").numpy()
        assert sorted(col.tolist()) == list(range(n))
        r, cc = linear_sum_assignment(c)
        assert c[np.arange(n), col].sum() == pytest.approx(c[r, cc].sum(), rel=1e-12, abs=1e-9)


@pytest.mark.parametrize("solver", ["auto", "scipy"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_linear_assignment_non_finite_cost_is_an_error(solver, bad):
    c = torch.rand(6, 6, dtype=torch.float64)
    c[2, 3] = bad
    with pytest.raises(ValueError, match="cost must be finite"):
        linear_assignment(c, solver=solver)
    with pytest.raises(ValueError, match="cost must be a square matrix"):
        linear_assignment(torch.rand(3, 4), solver=solver)


def test_exact_wasserstein_non_finite_input_is_an_error():
    a, b = torch.randn(5, 3), torch.randn(5, 3)
    a[1, 2] = float("nan")
    with pytest.raises(ValueError, match="a and b must be finite"):
        wasserstein(a, b, method="exact")


# --------------------------------------------------------------------------- exact
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("p", [1, 2, 1.5])
def test_exact_matches_scipy_and_pot(backend, p):
    n = 12
    a, b = torch.randn(n, 3, 4, dtype=torch.float64), torch.randn(n, 3, 4, dtype=torch.float64) + 0.3
    C = (cdist2(a, b) ** (p / 2)).numpy()
    r, c = linear_sum_assignment(C)
    want = C[r, c].mean()
    got = wasserstein(a, b, method="exact", p=p, backend=backend)
    assert got.item() == pytest.approx(want, rel=1e-10)
    assert got.item() == pytest.approx(ot.emd2(unif(n), unif(n), C), rel=1e-8)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("p", [1, 2])
def test_exact_gradient_finite_differences(backend, p):
    a = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    b = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, y: wasserstein(x, y, method="exact", p=p, backend=backend), (a, b))


def test_exact_fp32_images():
    a, b = torch.rand(16, 3, 8, 8), torch.rand(16, 3, 8, 8)
    C = cdist2(a, b).numpy()
    want = ot.emd2(unif(16), unif(16), C)
    assert wasserstein(a, b).item() == pytest.approx(want, rel=1e-5)


# --------------------------------------------------------------------------- sinkhorn
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("p", [1, 2])
def test_sinkhorn_matches_pot(backend, p):
    torch.manual_seed(3)
    a, b = torch.randn(7, 3, dtype=torch.float64), torch.randn(9, 3, dtype=torch.float64)  # N != M
    blur = 0.5
    C = (cdist2(a, b) ** (p / 2)).numpy()
    want = ot.sinkhorn2(unif(7), unif(9), C, reg=blur ** p, method="sinkhorn_log", numItermax=20000,
                        stopThr=1e-14)
    got = wasserstein(a, b, method="sinkhorn", p=p, blur=blur, max_iter=500, backend=backend)
    assert got.item() == pytest.approx(float(want), rel=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_sinkhorn_small_blur_approaches_exact(backend):
    a, b = torch.rand(10, 2, dtype=torch.float64), torch.rand(10, 2, dtype=torch.float64)
    exact = wasserstein(a, b, method="exact")
    got = wasserstein(a, b, method="sinkhorn", blur=0.01, max_iter=400, backend=backend)
    assert got.item() == pytest.approx(exact.item(), rel=2e-2)


@pytest.mark.parametrize("backend", cpu_backend_params())
@pytest.mark.parametrize("n,m", [(7, 9), (33, 50), (1, 17), (5, 1), (64, 64)])
def test_sinkhorn_fp32_costs_give_float64_potentials(backend, n, m):
    """The compiled iterations on fp32 costs (vectorised double exp, lane-split max and sum, row
    lengths that are not multiples of the vector width) return float64 potentials as
    accurate as the float64 iterations on the same costs."""
    from fastkd.ops.ot import _sinkhorn_torch, sinkhorn_eps_schedule

    torch.manual_seed(n * 100 + m)
    C = cdist2(torch.randn(n, 20).double(), torch.randn(m, 20).double()).float()
    sched = sinkhorn_eps_schedule(float(C.max()), 0.05, 2, 100)
    f64, g64 = _sinkhorn_torch(C.double(), sched)
    f, g = torch.ops.fastkd.sinkhorn_log(C, sched)
    assert f.dtype == g.dtype == torch.float64
    eps = float(sched[-1])
    # the plan depends on f_i + g_j only (f + c, g - c is the same solution)
    err = ((f[:, None] + g[None, :]) - (f64[:, None] + g64[None, :])).abs().max().item()
    assert err < 1e-4 * eps


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("blur", [1e-2, 1e-3, 1e-5])
def test_sinkhorn_fp32_small_blur_matches_fp64(backend, blur):
    """fp32 inputs with eps << max cost: fp32 potentials used to give wrong values (blur 1e-3)
    and NaN (blur 1e-5); the float64 potentials give the fp64 value."""
    torch.manual_seed(0)
    a, b = torch.randn(5, 3), torch.randn(7, 3)
    got = wasserstein(a, b, method="sinkhorn", blur=blur, backend=backend)
    want = wasserstein(a.double(), b.double(), method="sinkhorn", blur=blur, backend="torch")
    assert got.dtype == torch.float32
    assert got.item() == pytest.approx(want.item(), rel=1e-5)


def test_sinkhorn_fp32_large_images_matches_fp64():
    """eps / max cost ~ 5e-6 (blur 0.05 on 3072-pixel images): fp32 potentials were off by
    3e-3 relative; now the fp32 and fp64 values agree."""
    g = torch.Generator().manual_seed(0)
    a, b = torch.rand(32, 3072, generator=g), 0.7 * torch.rand(32, 3072, generator=g) + 0.2
    for backend in ["torch"] + [p.values[0] for p in cpu_backend_params() if fastkd.backends()["cpp"].available]:
        got = wasserstein(a, b, method="sinkhorn", blur=0.05, max_iter=24, backend=backend)
        want = wasserstein(a.double(), b.double(), method="sinkhorn", blur=0.05, max_iter=24, backend="torch")
        assert got.item() == pytest.approx(want.item(), rel=1e-6), backend


def _entropic_objective(a, b, eps):
    """<P, C> + eps KL(P | mu x nu) at POT's converged plan (an independent value)."""
    n, m = a.shape[0], b.shape[0]
    C = cdist2(a, b).numpy()
    P = ot.sinkhorn(unif(n), unif(m), C, reg=eps, method="sinkhorn_log", numItermax=5000, stopThr=1e-13)
    Pp = np.maximum(P, 1e-300)
    return float((P * C).sum() + eps * (P * np.log(Pp * n * m)).sum())


@pytest.mark.parametrize("backend", BACKENDS)
def test_sinkhorn_gradient_finite_differences(backend):
    torch.manual_seed(4)
    a = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
    b = torch.randn(6, 3, dtype=torch.float64, requires_grad=True)
    blur = 0.6
    val = wasserstein(a, b, method="sinkhorn", blur=blur, max_iter=600, backend=backend)
    ga, gb = torch.autograd.grad(val, (a, b))
    h = 1e-5
    for _ in range(3):
        va, vb = torch.randn_like(a), torch.randn_like(b)
        fd = (_entropic_objective(a.detach() + h * va, b.detach() + h * vb, blur ** 2)
              - _entropic_objective(a.detach() - h * va, b.detach() - h * vb, blur ** 2)) / (2 * h)
        an = (ga * va).sum().item() + (gb * vb).sum().item()
        assert an == pytest.approx(fd, rel=1e-5, abs=1e-7)


# --------------------------------------------------------------------------- sliced
def test_directions_are_unit_and_seeded():
    t1 = sliced_directions(50, 8, 7)
    assert torch.allclose(t1.norm(dim=0), torch.ones(8), atol=1e-6)
    assert torch.equal(t1, sliced_directions(50, 8, 7))
    assert not torch.allclose(t1, sliced_directions(50, 8, 8))
    z = sliced_directions(20000, 4, 1) * math.sqrt(20000)  # back to ~N(0, 1) coordinates
    assert abs(z.mean().item()) < 0.02 and abs(z.std().item() - 1) < 0.02


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("p", [1, 2])
def test_sliced_matches_pot(backend, p):
    n, L, seed = 11, 16, 5
    a, b = torch.randn(n, 2, 5, dtype=torch.float64), torch.randn(n, 2, 5, dtype=torch.float64) + 0.5
    theta = sliced_directions(10, L, seed, dtype=torch.float64).numpy()
    want = ot.sliced_wasserstein_distance(a.flatten(1).numpy(), b.flatten(1).numpy(), n_projections=L, p=p,
                                          projections=theta) ** p
    got = wasserstein(a, b, method="sliced", p=p, n_projections=L, seed=seed, backend=backend)
    assert got.item() == pytest.approx(float(want), rel=1e-6)


@pytest.mark.parametrize("backend", cpu_backend_params())
def test_fused_projection_matches_directions(backend):
    x = torch.randn(5, 3000, dtype=torch.float64)
    proj, inv = torch.ops.fastkd.sliced_project(x, 19, 12345)
    torch.testing.assert_close(proj, x @ sliced_directions(3000, 19, 12345, dtype=torch.float64),
                               rtol=1e-5, atol=1e-5)
    g = torch.randn(5, 19, dtype=torch.float64)
    back = torch.ops.fastkd.sliced_backproject(g, inv, 3000, 12345)
    torch.testing.assert_close(back, g @ sliced_directions(3000, 19, 12345, dtype=torch.float64).T,
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("p", [1, 2])
def test_sliced_gradient_finite_differences(backend, p):
    a = torch.randn(6, 5, dtype=torch.float64, requires_grad=True)
    b = torch.randn(6, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda x, y: wasserstein(x, y, method="sliced", p=p, n_projections=8, seed=3, backend=backend), (a, b))


@pytest.mark.parametrize("backend", cpu_backend_params())
@pytest.mark.parametrize("grads", ["a", "b", "ab"])
def test_sliced_gradients_match_torch_backend_when_one_or_both_need_them(backend, grads):
    """The fused path back-projects both gradients in one call (or only the one needed)."""
    torch.manual_seed(5)
    a0, b0 = torch.randn(7, 3, 5, 5), torch.randn(7, 3, 5, 5)
    out = {}
    for be in ("torch", backend):
        a = a0.clone().requires_grad_("a" in grads)
        b = b0.clone().requires_grad_("b" in grads)
        wasserstein(a, b, method="sliced", n_projections=16, seed=9, backend=be).backward()
        out[be] = (a.grad, b.grad)
    for got, want, name in zip(out[backend], out["torch"], "ab"):
        if name in grads:
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
        else:
            assert got is None and want is None


def test_sliced_seed_none_uses_torch_generator():
    a, b = torch.randn(4, 6), torch.randn(4, 6)
    torch.manual_seed(9)
    v1 = wasserstein(a, b, method="sliced")
    torch.manual_seed(9)
    v2 = wasserstein(a, b, method="sliced")
    assert torch.equal(v1, v2)


def test_sliced_fp32_backends_agree():
    if not fastkd.backends()["cpp"].available:
        pytest.skip("cpp extension not built")
    a, b = torch.rand(32, 3, 16, 16), torch.rand(32, 3, 16, 16)
    v_t = wasserstein(a, b, method="sliced", seed=1, backend="torch")
    v_c = wasserstein(a, b, method="sliced", seed=1, backend="cpp")
    assert v_c.item() == pytest.approx(v_t.item(), rel=1e-4)


# --------------------------------------------------------------------------- module
@pytest.mark.parametrize("metric", ["l1", "l2", "wasserstein-exact", "wasserstein-sinkhorn", "wasserstein-sliced"])
def test_module_with_frozen_generator(metric):
    G = torch.nn.Sequential(torch.nn.Linear(4, 3 * 4 * 4), torch.nn.Unflatten(1, (3, 4, 4))).double()
    G.requires_grad_(False)
    s = torch.randn(6, 4, dtype=torch.float64, requires_grad=True)
    t = torch.randn(6, 4, dtype=torch.float64)
    loss_fn = ImageMatchingLoss(metric, seed=0, blur=0.5)
    loss = loss_fn(G(s), G(t))
    loss.backward()
    assert s.grad is not None and torch.isfinite(s.grad).all() and s.grad.abs().sum() > 0
    assert all(p.grad is None for p in G.parameters())
    x, y = G(s).detach(), G(t)
    if metric in ("l1", "l2"):
        want = image_distance(x, y, p=1 if metric == "l1" else 2)
    else:
        want = wasserstein(x, y, method=metric.split("-")[1], seed=0, blur=0.5)
    torch.testing.assert_close(loss.detach(), want)
    assert metric in repr(loss_fn)


def test_module_bad_metric():
    with pytest.raises(ValueError, match="metric must be one of"):
        ImageMatchingLoss("l3")


# --------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("a,b,kw,match", [
    (torch.randn(3, 4), torch.randn(3, 5), {}, "same trailing shape"),
    (torch.randn(3, 4), torch.randn(4, 4), {"method": "exact"}, "b must hold as many samples"),
    (torch.randn(3, 4), torch.randn(4, 4), {"method": "sliced"}, "b must hold as many samples"),
    (torch.randn(0, 4), torch.randn(0, 4), {"method": "sinkhorn"}, "a is an empty set"),
    (torch.randn(2, 4), torch.randn(0, 4), {"method": "sinkhorn"}, "b is an empty set"),
    (torch.ones(3, 4, dtype=torch.int32), torch.ones(3, 4, dtype=torch.int32), {}, "a must be a floating"),
    (torch.randn(3, 4), torch.randn(3, 4), {"method": "sinkhorn", "blur": 0.0}, "blur must be a positive"),
    (torch.randn(3, 4), torch.randn(3, 4), {"method": "sinkhorn", "blur": -1}, "blur must be a positive"),
    (torch.randn(3, 4), torch.randn(3, 4), {"method": "emd"}, "method must be one of"),
    (torch.randn(3, 4), torch.randn(3, 4), {"p": 0.5}, "p must be a real number >= 1"),
    (torch.randn(3, 4), torch.randn(3, 4), {"max_iter": 0}, "max_iter must be a positive"),
    (torch.randn(3, 4), torch.randn(3, 4), {"n_projections": 0}, "n_projections must be a positive"),
    (torch.randn(3, 4), torch.randn(3, 4), {"seed": -1}, "seed must be None"),
    (torch.randn(3), torch.randn(3), {}, "a must have shape"),
])
def test_bad_input(a, b, kw, match):
    with pytest.raises((ValueError, TypeError), match=match):
        wasserstein(a, b, **kw)


def test_sqdist_bad_input():
    with pytest.raises(ValueError, match="same trailing shape"):
        pairwise_sqdist(torch.randn(2, 3), torch.randn(2, 4))
    with pytest.raises(TypeError, match="b must be a floating"):
        pairwise_sqdist(torch.randn(2, 3), torch.ones(2, 3, dtype=torch.long))


# --------------------------------------------------------------------------- GPU
@pytest.mark.skipif(not HAS_CUDA, reason="no CUDA device on this machine")
@pytest.mark.parametrize("backend", gpu_backend_params())
def test_gpu_backends(backend):
    a = torch.randn(40, 3, 8, 8, device="cuda", dtype=torch.float64)
    b = torch.randn(40, 3, 8, 8, device="cuda", dtype=torch.float64)
    torch.testing.assert_close(pairwise_sqdist(a, b, backend=backend), cdist2(a, b), rtol=1e-9, atol=1e-9)
    a32 = torch.rand(6, 150528, device="cuda")
    b32 = a32 + 0.01 * torch.randn_like(a32)
    ref = cdist2(a32, b32)
    assert ((pairwise_sqdist(a32, b32, backend=backend).double() - ref).abs() / ref).max() < 1e-4
    for method in ("exact", "sinkhorn", "sliced"):
        got = wasserstein(a, b, method=method, seed=2, backend=backend)
        want = wasserstein(a.cpu(), b.cpu(), method=method, seed=2, backend="torch")
        assert got.item() == pytest.approx(want.item(), rel=1e-6)
    ar = a.clone().requires_grad_(True)
    wasserstein(ar, b, method="sliced", seed=2, backend=backend).backward()
    ac = a.cpu().requires_grad_(True)
    wasserstein(ac, b.cpu(), method="sliced", seed=2, backend="torch").backward()
    torch.testing.assert_close(ar.grad.cpu(), ac.grad, rtol=1e-5, atol=1e-8)
    an = a.flatten(1).clone()
    an[1, 2] = float("nan")
    assert torch.equal(torch.isnan(pairwise_sqdist(an, b.flatten(1), backend=backend)).cpu(),
                       torch.isnan(pairwise_sqdist(an.cpu(), b.flatten(1).cpu(), backend="torch")))


def test_sqdist_cpp_torch_compile_fullgraph_forward_backward():
    if not fastkd.backends()["cpp"].available:
        pytest.skip(fastkd.backends()["cpp"].reason)
    a = torch.rand(6, 5, dtype=torch.float64, requires_grad=True)
    b = torch.rand(4, 5, dtype=torch.float64, requires_grad=True)
    w = torch.rand(6, 4, dtype=torch.float64)
    f = torch.compile(lambda x, y: (pairwise_sqdist(x, y, backend="cpp") * w).sum(), fullgraph=True)
    ga, gb = torch.autograd.grad(f(a, b), (a, b))
    from fastkd.ops.ot import pairwise_sqdist_reference

    ra, rb = torch.autograd.grad((pairwise_sqdist_reference(a, b) * w).sum(), (a, b))
    torch.testing.assert_close(ga, ra)
    torch.testing.assert_close(gb, rb)
    # only one input requiring grad: the other gradient is not computed
    a2 = a.detach().requires_grad_(True)
    (g1,) = torch.autograd.grad((pairwise_sqdist(a2, b.detach(), backend="cpp") * w).sum(), (a2,))
    torch.testing.assert_close(g1, ra)
