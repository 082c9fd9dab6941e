"""fastkd.ops.langevin_step_ and fastkd.optim.Langevin against the PyTorch reference."""
import math

import pytest
import torch

import fastkd
from fastkd.ops import langevin_step_, langevin_step_reference, philox_normal, tv_loss

from conftest import HAS_CUDA, cpu_backend_params, gpu_backend_params

ALL_CPU = ["torch"] + cpu_backend_params()


def _xg(shape=(3, 2, 9, 7), dtype=torch.float64, device="cpu"):
    return torch.randn(shape, dtype=dtype, device=device), torch.randn(shape, dtype=dtype, device=device)


def _assert_normal(z: torch.Tensor, std: float = 1.0):
    z = z.double().flatten()
    n = z.numel()
    mean_se = std / math.sqrt(n)
    var_se = std**2 * math.sqrt(2.0 / (n - 1))
    assert abs(z.mean().item()) < 5 * mean_se, (z.mean().item(), mean_se)
    assert abs(z.var().item() - std**2) < 5 * var_se, (z.var().item(), var_se)
    zc = (z - z.mean()) / z.std()
    lag1 = (zc[1:] * zc[:-1]).mean().item()
    lag4 = (zc[4:] * zc[:-4]).mean().item()
    assert abs(lag1) < 5 / math.sqrt(n) and abs(lag4) < 5 / math.sqrt(n), (lag1, lag4)


# --------------------------------------------------------------------------- noise
@pytest.mark.parametrize("backend", ALL_CPU)
def test_noise_statistics_1m(backend):
    n = 1 << 20
    x = torch.zeros(4, n // 4)
    langevin_step_(x, torch.zeros_like(x), 0.5, seed=1234, backend=backend)  # noise_std = sqrt(2*0.5) = 1
    _assert_normal(x)
    y = torch.zeros(4, n // 4)
    langevin_step_(y, torch.zeros_like(y), 0.5, noise_std=3.0, seed=99, backend=backend)
    _assert_normal(y, 3.0)
    # tails: fraction beyond 3 sigma within 5 standard errors of the normal value
    frac = (x.abs() > 3).double().mean().item()
    p3 = math.erfc(3 / math.sqrt(2))
    assert abs(frac - p3) < 5 * math.sqrt(p3 * (1 - p3) / n)


def test_compiled_generator_matches_reference_stream():
    if not fastkd.backends()["cpp"].available:
        pytest.skip(fastkd.backends()["cpp"].reason)
    for seed, off, n in [(0, 0, 1000), (2**40 + 5, 3, 777), (123, 2**33 + 1, 50)]:
        got = torch.ops.fastkd.philox_normal(n, seed, off)
        want = philox_normal(n, seed, off)
        torch.testing.assert_close(got, want, rtol=0, atol=2e-5)


def test_reference_philox_known_answer():
    # Philox4x32-10 known-answer vectors (counter 0 / key 0 and all-ones counter and key parts).
    from fastkd.ops.langevin import _philox_blocks

    u = _philox_blocks(torch.tensor([0]), 0)
    assert [int(t) for t in u] == [0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8]


# (seed, element) pairs whose Box-Muller radius uniform is exactly 1 (top 24 bits of the
# Philox word all ones, probability 2^-24 per pair of normals), found by searching the
# reference generator: -2 log(1) is -0.0 there, and the normal must come out as 0.
_RADIUS_ZERO = [(4696, 376), (5947, 166), (13045, 138), (25665, 126)]


def test_reference_radius_zero_cases():
    for seed, e in _RADIUS_ZERO:
        z = philox_normal(e + 2, seed)
        assert z[e].item() == 0.0 and z[e + 1].item() == 0.0, (seed, e, z[e:e + 2])


@pytest.mark.parametrize("backend", ALL_CPU + gpu_backend_params())
def test_uniform_one_gives_zero_normal_not_overflow(backend):
    device = "cuda" if backend in ("cuda", "triton") else "cpu"
    for seed, e in _RADIUS_ZERO:
        x = torch.zeros(2, 256, device=device)
        langevin_step_(x, torch.zeros_like(x), 0.5, noise_std=1.0, seed=seed, backend=backend)
        want = philox_normal(512, seed, 0, device)
        flat = x.flatten()
        assert torch.isfinite(flat).all() and flat.abs().max().item() < 7, (seed, flat.abs().max().item())
        assert abs(flat[e].item()) < 1e-5 and abs(flat[e + 1].item()) < 1e-5, (seed, e, flat[e:e + 2])
        torch.testing.assert_close(flat, want, rtol=0, atol=5e-5)


@pytest.mark.parametrize("backend", ALL_CPU)
def test_seed_reproducible_and_distinct(backend):
    x, g = _xg((2, 3, 5, 6), torch.float32)
    a, b, c = x.clone(), x.clone(), x.clone()
    langevin_step_(a, g, 0.01, seed=7, backend=backend)
    langevin_step_(b, g, 0.01, seed=7, backend=backend)
    langevin_step_(c, g, 0.01, seed=8, backend=backend)
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)
    torch.manual_seed(3)
    d = x.clone()
    langevin_step_(d, g, 0.01, backend=backend)
    torch.manual_seed(3)
    e = x.clone()
    langevin_step_(e, g, 0.01, backend=backend)
    assert torch.equal(d, e)


# --------------------------------------------------------------------------- against the formula
@pytest.mark.parametrize("backend", ALL_CPU)
@pytest.mark.parametrize("shape", [(1, 1), (3, 2, 9, 7), (5, 17), (2, 3, 1, 13)])
def test_plain_gradient_step(backend, shape):
    x, g = _xg(shape)
    want = x - 0.3 * g
    out = langevin_step_(x, g, 0.3, noise_std=0.0, backend=backend)
    assert out is x
    torch.testing.assert_close(x, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend", ALL_CPU)
@pytest.mark.parametrize("tv_p", [1, 2])
@pytest.mark.parametrize("shape", [(2, 3, 9, 7), (1, 2, 1, 11), (2, 1, 6, 1), (3, 2, 33, 40)])
def test_fused_tv_gradient_equals_autograd(backend, tv_p, shape):
    x, _ = _xg(shape)
    xr = x.clone().requires_grad_(True)
    tv_loss(xr, p=tv_p, reduction="mean", backend="torch").backward()
    w = 2.5
    out = x.clone()
    langevin_step_(out, torch.zeros_like(x), 1.0, noise_std=0.0, tv_weight=w, tv_p=tv_p, backend=backend)
    torch.testing.assert_close((x - out) / w, xr.grad, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("backend", cpu_backend_params())
@pytest.mark.parametrize("tv_weight", [0.0, 3.0])
@pytest.mark.parametrize("per_sample", [False, True])
@pytest.mark.parametrize("clamp", [None, (-0.5, 0.7)])
def test_full_step_matches_reference(backend, tv_weight, per_sample, clamp):
    x, g = _xg((3, 2, 10, 9), torch.float32)
    lr = torch.tensor([0.01, 0.2, 0.05]) if per_sample else 0.03
    want = langevin_step_reference(x, g, lr, None, clamp, tv_weight, 2, seed=42)
    got = x.clone()
    langevin_step_(got, g, lr, clamp=clamp, tv_weight=tv_weight, tv_p=2, seed=42, backend=backend)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=2e-5)


@pytest.mark.parametrize("backend", ALL_CPU)
def test_clamp(backend):
    x, g = _xg((4, 3, 8, 8), torch.float32)
    langevin_step_(x, g, 0.5, clamp=(-0.25, 0.5), tv_weight=1.0, seed=1, backend=backend)
    assert x.min() >= -0.25 and x.max() <= 0.5
    assert (x == -0.25).any() and (x == 0.5).any()


@pytest.mark.parametrize("backend", ALL_CPU)
def test_per_sample_lr_and_noise(backend):
    x, g = _xg((3, 4, 5))
    lr = torch.tensor([0.1, 0.0001, 1.0], dtype=torch.float64)
    out = x.clone()
    langevin_step_(out, g, lr, noise_std=0.0, backend=backend)
    torch.testing.assert_close(out, x - lr.view(3, 1, 1) * g)
    # default noise_std = sqrt(2 lr) per sample: residual std follows it
    big = torch.zeros(3, 200000)
    langevin_step_(big, torch.zeros_like(big), torch.tensor([0.5, 2.0, 0.02]), seed=5, backend=backend)
    torch.testing.assert_close(big.std(1), torch.tensor([1.0, 2.0, 0.2]), rtol=0.02, atol=0)
    sd = torch.tensor([0.0, 1.0, 0.5])
    y = torch.zeros(3, 100000)
    langevin_step_(y, torch.zeros_like(y), 0.1, noise_std=sd, seed=5, backend=backend)
    assert torch.equal(y[0], torch.zeros_like(y[0]))
    torch.testing.assert_close(y[1:].std(1), sd[1:], rtol=0.02, atol=0)


@pytest.mark.parametrize("backend", cpu_backend_params())
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_dtypes(backend, dtype):
    x, g = _xg((2, 3, 7, 6), dtype)
    want = langevin_step_reference(x, g, 0.05, None, (-1.0, 1.0), 0.5, 1, seed=3)
    got = x.clone()
    langevin_step_(got, g, 0.05, clamp=(-1.0, 1.0), tv_weight=0.5, seed=3, backend=backend)
    tol = {torch.float16: 2e-3, torch.bfloat16: 2e-2, torch.float64: 1e-5}[dtype]
    torch.testing.assert_close(got, want, rtol=tol, atol=tol)


@pytest.mark.parametrize("backend", ALL_CPU)
def test_noncontiguous_x(backend):
    base, gb = _xg((3, 9, 7, 2), torch.float32)
    x = base.permute(0, 3, 1, 2)  # (3, 2, 9, 7) strided
    g = gb.permute(0, 3, 1, 2)
    want = langevin_step_reference(x, g, 0.1, None, None, 1.0, 1, seed=11)
    out = langevin_step_(x, g, 0.1, tv_weight=1.0, seed=11, backend=backend)
    assert out is x
    torch.testing.assert_close(base.permute(0, 3, 1, 2), want, rtol=1e-5, atol=2e-5)


def test_leaf_requiring_grad_is_updated_in_place():
    x = torch.randn(2, 3, requires_grad=True)
    g = torch.ones(2, 3)
    before = x.detach().clone()
    langevin_step_(x, g, 0.1, noise_std=0.0)
    torch.testing.assert_close(x.detach(), before - 0.1)


@pytest.mark.parametrize("backend", cpu_backend_params())
def test_opcheck(backend):
    x, g = _xg((2, 3, 5, 4), torch.float32)
    torch.library.opcheck(torch.ops.fastkd.langevin_step_.default,
                          (x, g, None, 0.1, None, 0.2, True, -1.0, 1.0, 0.5, 1, 9))


@pytest.mark.slow
@pytest.mark.parametrize("backend", cpu_backend_params())
def test_torch_compile_fullgraph(backend):
    torch._dynamo.reset()

    def f(x, g):
        return langevin_step_(x, g, 0.1, clamp=(-2.0, 2.0), seed=3, backend=backend)

    x, g = _xg((2, 3, 6, 5), torch.float32)
    a, b = x.clone(), x.clone()
    torch.compile(f, fullgraph=True)(a, g)
    f(b, g)
    torch.testing.assert_close(a, b)


# --------------------------------------------------------------------------- optimizer
def test_optimizer_plain_step_equals_sgd():
    p1 = torch.nn.Parameter(torch.randn(4, 3, 5, 5))
    p2 = torch.nn.Parameter(p1.detach().clone())
    opt1 = fastkd.optim.Langevin([p1], lr=0.1, noise_std=0.0)
    opt2 = torch.optim.SGD([p2], lr=0.1)
    for _ in range(3):
        for p, o in ((p1, opt1), (p2, opt2)):
            o.zero_grad()
            (p.square().sum() + p.sum()).backward()
            o.step()
    torch.testing.assert_close(p1, p2)


def test_optimizer_seeded_reproducible_and_steps_differ():
    def run():
        p = torch.nn.Parameter(torch.zeros(2, 3, 4, 4))
        opt = fastkd.optim.Langevin([p], lr=0.5, seed=17, tv_weight=0.1, clamp=(-3.0, 3.0))
        noise = []
        for _ in range(2):
            opt.zero_grad()
            p.grad = torch.zeros_like(p)
            before = p.detach().clone()
            opt.step()
            noise.append(p.detach() - before)
        return noise

    a, b = run(), run()
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.allclose(a[0], a[1])


def test_optimizer_closure_and_bad_args():
    p = torch.nn.Parameter(torch.randn(3, 4))
    opt = fastkd.optim.Langevin([p], lr=0.01)

    def closure():
        opt.zero_grad()
        loss = p.square().sum()
        loss.backward()
        return loss

    assert torch.isfinite(opt.step(closure))
    with pytest.raises(ValueError, match="lr must be > 0"):
        fastkd.optim.Langevin([p], lr=0.0)
    with pytest.raises(ValueError, match="clamp"):
        fastkd.optim.Langevin([p], lr=0.1, clamp=(1.0, 0.0))


# --------------------------------------------------------------------------- bad input
def _bad(**kw):
    x, g = _xg((2, 3, 4, 4), torch.float32)
    args = dict(x=x, grad=g, lr=0.1)
    args.update(kw)
    langevin_step_(args.pop("x"), args.pop("grad"), args.pop("lr"), **args)


@pytest.mark.parametrize("kw,exc,match", [
    ({"lr": 0.0}, ValueError, "lr must be finite and > 0, got 0.0"),
    ({"lr": -1.0}, ValueError, "lr must be finite and > 0"),
    ({"lr": float("nan")}, ValueError, "lr must be finite"),
    ({"lr": "0.1"}, TypeError, "lr must be a float"),
    ({"lr": torch.tensor([0.1, 0.0])}, ValueError, "every lr must be finite and > 0"),
    ({"lr": torch.tensor([0.1, 0.2, 0.3])}, ValueError, r"lr tensor must have shape \(N,\)"),
    ({"lr": torch.tensor([1, 2])}, TypeError, "lr tensor must be floating point"),
    ({"noise_std": -1.0}, ValueError, "noise_std must be finite and >= 0"),
    ({"clamp": (1.0, 1.0)}, ValueError, "clamp must have lo < hi"),
    ({"clamp": (2.0, -1.0)}, ValueError, "clamp must have lo < hi"),
    ({"clamp": 1.0}, TypeError, "clamp must be None or a pair"),
    ({"grad": torch.randn(2, 3, 4, 5)}, ValueError, "grad must have x's shape"),
    ({"grad": torch.randn(2, 3, 4, 4, dtype=torch.float64)}, TypeError, "grad must have x's dtype"),
    ({"grad": [1.0]}, TypeError, "grad must be a torch.Tensor"),
    ({"x": torch.zeros(2, 3, dtype=torch.long), "grad": torch.zeros(2, 3, dtype=torch.long)}, TypeError,
     "x must be a floating-point"),
    ({"tv_p": 3, "tv_weight": 1.0}, ValueError, "tv_p must be 1 or 2"),
    ({"tv_weight": -1.0}, ValueError, "tv_weight must be finite and >= 0"),
    ({"x": torch.zeros(2, 3), "grad": torch.zeros(2, 3), "tv_weight": 1.0}, ValueError, r"needs x of shape \(N, C, H, W\)"),
    ({"seed": -1}, ValueError, "seed must be None or an integer"),
    ({"seed": 1.5}, ValueError, "seed must be None or an integer"),
])
@pytest.mark.parametrize("backend", ["auto", "torch"])
def test_bad_input(kw, exc, match, backend):
    with pytest.raises(exc, match=match):
        _bad(backend=backend, **kw)


@pytest.mark.skipif(not HAS_CUDA, reason="no CUDA device on this machine")
def test_grad_on_another_device():
    x = torch.randn(2, 3, device="cuda")
    with pytest.raises(ValueError, match="grad must be on x's device"):
        langevin_step_(x, torch.randn(2, 3), 0.1)


def test_grad_on_another_device_meta():
    x = torch.randn(2, 3)
    with pytest.raises(ValueError, match="grad must be on x's device"):
        langevin_step_(x, torch.randn(2, 3, device="meta"), 0.1)


# --------------------------------------------------------------------------- GPU
@pytest.mark.skipif(not HAS_CUDA, reason="no CUDA device on this machine")
@pytest.mark.parametrize("backend", gpu_backend_params())
@pytest.mark.parametrize("tv_weight", [0.0, 2.0])
def test_gpu_matches_reference(backend, tv_weight):
    x, g = _xg((3, 2, 37, 45), torch.float32, "cuda")
    lr = torch.tensor([0.01, 0.2, 0.05], device="cuda")
    want = langevin_step_reference(x, g, lr, None, (-1.0, 1.5), tv_weight, 1, seed=42)
    got = x.clone()
    langevin_step_(got, g, lr, clamp=(-1.0, 1.5), tv_weight=tv_weight, seed=42, backend=backend)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=5e-5)


@pytest.mark.skipif(not HAS_CUDA, reason="no CUDA device on this machine")
@pytest.mark.parametrize("backend", gpu_backend_params())
def test_gpu_noise_statistics(backend):
    x = torch.zeros(4, 1 << 18, device="cuda")
    langevin_step_(x, torch.zeros_like(x), 0.5, seed=1, backend=backend)
    _assert_normal(x.cpu())


def test_default_noise_of_a_float64_per_sample_lr_is_exact():
    # noise_std defaults to sqrt(2 lr) computed in lr's own dtype, as the reference does
    x = torch.randn(3, 2, 5, 7, dtype=torch.float64)
    g = torch.randn_like(x)
    lr = torch.tensor([0.01, 0.2, 0.07], dtype=torch.float64)
    got = langevin_step_(x.clone(), g, lr, seed=5, backend="torch")
    torch.testing.assert_close(got, langevin_step_reference(x, g, lr, seed=5), rtol=1e-15, atol=1e-15)


def test_auto_skips_the_cuda_tv_kernel_for_wide_images(monkeypatch):
    # the CUDA kernel's fused TV prior takes width <= CUDA_TV_MAX_WIDTH: "auto" must pick the
    # next backend for wider images (not raise), and naming "cuda" must say why it cannot
    from fastkd import _backend as B
    from fastkd.ops import langevin as L

    monkeypatch.delenv("FASTKD_BACKEND", raising=False)
    monkeypatch.setattr(B, "backend_status", lambda name: B.BackendStatus(name, True, ""))
    cuda, W = torch.device("cuda"), L.CUDA_TV_MAX_WIDTH
    assert L._resolve_backend("auto", cuda, (2, 3, 4, W), 1.0) == "cuda"
    assert L._resolve_backend("auto", cuda, (2, 3, 4, W + 1), 0.0) == "cuda"
    assert L._resolve_backend("auto", cuda, (2, 3, 4, W + 1), 1.0) == "triton"
    with pytest.raises(B.BackendUnavailableError, match="width at most 2048, got width 2049"):
        L._resolve_backend("cuda", cuda, (2, 3, 4, W + 1), 1.0)
    monkeypatch.setenv("FASTKD_BACKEND", "cuda")
    with pytest.raises(B.BackendUnavailableError, match="width at most"):
        L._resolve_backend("auto", cuda, (2, 3, 4, W + 1), 1.0)
