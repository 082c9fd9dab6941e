"""fastkd.ops.bn_stats_loss and fastkd.nn.BNStatsLoss: every backend against the reference."""
import numpy as np
import pytest
import torch
from torch import nn

import fastkd
from fastkd.nn import BNStatsLoss
from fastkd.ops import batch_stats_reference, bn_stats_loss, bn_stats_loss_reference

from conftest import HAS_CUDA, cpu_backend_params, gpu_backend_params

# (N, C) and (N, C, H, W) with planes below and above the C++ plane/row switch (32).
SHAPES = [(1, 1), (7, 3), (64, 33), (1, 1, 1, 1), (2, 3, 1, 5), (5, 4, 3, 3), (3, 2, 8, 8),
          (2, 5, 17, 9), (1, 3, 40, 40)]


def naive_loss(x: np.ndarray, rm: np.ndarray, rv: np.ndarray) -> float:
    """Loop-by-loop definition in float64."""
    N, C = x.shape[:2]
    xs = x.reshape(N, C, -1)
    dm = dv = 0.0
    for c in range(C):
        vals = xs[:, c, :].ravel().astype(np.float64)
        mu = sum(vals) / len(vals)
        var = sum((v - mu) ** 2 for v in vals) / len(vals)
        dm += (mu - rm[c]) ** 2
        dv += (var - rv[c]) ** 2
    return dm ** 0.5 + dv ** 0.5


def _stats(C, dtype=torch.float64, device="cpu"):
    return (torch.randn(C, dtype=dtype, device=device) * 0.5,
            torch.rand(C, dtype=dtype, device=device) + 0.5)


@pytest.mark.parametrize("shape", [(1, 1), (4, 3), (2, 3, 4, 5), (3, 2, 1, 1)])
def test_reference_matches_definition(shape):
    x = torch.randn(shape, dtype=torch.float64) * 2 + 1
    rm, rv = _stats(shape[1])
    want = naive_loss(x.numpy(), rm.numpy(), rv.numpy())
    got = bn_stats_loss_reference(x, rm, rv)
    np.testing.assert_allclose(got.item(), want, rtol=1e-12)
    m, v = batch_stats_reference(x)
    torch.testing.assert_close(v, x.transpose(0, 1).reshape(shape[1], -1).var(1, unbiased=False))


def _check_backend(backend, device, shape, dtype=torch.float64, make=None, offset=0.0):
    x = torch.randn(shape, dtype=dtype, device=device) * 1.7 + offset
    if make is not None:
        x = make(x)
    rm, rv = _stats(x.shape[1], dtype=torch.float64 if dtype == torch.float64 else torch.float32, device=device)
    rm = rm + offset
    x = x.detach().requires_grad_(True)
    xr = x.detach().clone().requires_grad_(True)
    rm1, rv1 = rm.clone().requires_grad_(True), rv.clone().requires_grad_(True)
    rm2, rv2 = rm.clone().requires_grad_(True), rv.clone().requires_grad_(True)
    got = bn_stats_loss(x, rm1, rv1, backend=backend)
    want = bn_stats_loss_reference(xr, rm2, rv2)
    assert got.shape == want.shape == () and got.dtype == want.dtype == dtype
    (2.5 * got).backward()
    (2.5 * want).backward()
    tol = dict(rtol=1e-9, atol=1e-10) if dtype == torch.float64 else dict(rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(got, want, **tol)
    torch.testing.assert_close(x.grad, xr.grad, **tol)
    torch.testing.assert_close(rm1.grad, rm2.grad, **tol)
    torch.testing.assert_close(rv1.grad, rv2.grad, **tol)


@pytest.mark.parametrize("backend", cpu_backend_params())
@pytest.mark.parametrize("shape", SHAPES)
def test_cpu_backend_matches_reference(backend, shape):
    _check_backend(backend, "cpu", shape)


@pytest.mark.parametrize("backend", cpu_backend_params())
@pytest.mark.parametrize("shape", [(256, 64, 8, 8), (128, 300), (16, 8, 64, 64)])
def test_cpu_backend_fp32(backend, shape):
    _check_backend(backend, "cpu", shape, dtype=torch.float32)


@pytest.mark.parametrize("backend", cpu_backend_params())
@pytest.mark.parametrize("shape", [(64, 16), (8, 4, 16, 16)])
def test_cpu_backend_large_offset_is_stable(backend, shape):
    # mean far from zero relative to the spread: naive E[x^2] - E[x]^2 would cancel
    x = torch.randn(shape, dtype=torch.float32) * 1e-2 + 1e3
    rm, rv = torch.full((shape[1],), 1e3), torch.full((shape[1],), 1e-4)
    _, m, v, _ = torch.ops.fastkd.bn_stats_fwd(x, rm, rv)
    m_ref, v_ref = batch_stats_reference(x.double())
    torch.testing.assert_close(v.double(), v_ref, rtol=1e-3, atol=1e-9)
    torch.testing.assert_close(m.double(), m_ref, rtol=1e-6, atol=1e-6)


NONCONTIG = {
    "channels_last": lambda x: x.contiguous(memory_format=torch.channels_last),
    "sliced": lambda x: x[:, :, ::2, 1:],
    "transposed": lambda x: x.transpose(2, 3),
    "expanded": lambda x: x[:1].expand(3, -1, -1, -1),
}


@pytest.mark.parametrize("backend", cpu_backend_params())
@pytest.mark.parametrize("layout", sorted(NONCONTIG))
def test_cpu_backend_noncontiguous(backend, layout):
    _check_backend(backend, "cpu", (3, 4, 10, 13), make=NONCONTIG[layout])


@pytest.mark.parametrize("backend", cpu_backend_params())
def test_cpu_backend_noncontiguous_2d(backend):
    _check_backend(backend, "cpu", (9, 6), make=lambda x: x.t().contiguous().t()[:, ::2])


def _low_precision_check(backend, device, dtype):
    x = (torch.randn(8, 6, 9, 9, dtype=torch.float64, device=device) * 2 + 0.5).to(dtype)
    rm, rv = _stats(6, torch.float32, device)
    exact = bn_stats_loss_reference(x.double(), rm.double(), rv.double())
    xe = x.detach().clone().requires_grad_(True)
    xo = x.detach().clone().requires_grad_(True)
    eager = bn_stats_loss_reference(xe, rm, rv)
    ours = bn_stats_loss(xo, rm, rv, backend=backend)
    eager.backward()
    ours.backward()
    xg = x.double().requires_grad_(True)
    bn_stats_loss_reference(xg, rm.double(), rv.double()).backward()
    assert ours.dtype == dtype and xo.grad.dtype == dtype
    ulp = torch.finfo(dtype).eps * abs(exact.item())
    assert abs(ours.double().item() - exact.item()) <= 2 * abs(eager.double().item() - exact.item()) + ulp
    g_e = (xe.grad.double() - xg.grad).abs().max().item()
    g_o = (xo.grad.double() - xg.grad).abs().max().item()
    assert g_o <= 2 * g_e + torch.finfo(dtype).eps * xg.grad.abs().max().item()


@pytest.mark.parametrize("backend", cpu_backend_params())
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cpu_backend_low_precision(backend, dtype):
    _low_precision_check(backend, "cpu", dtype)


@pytest.mark.parametrize("backend", ["torch"] + cpu_backend_params())
@pytest.mark.parametrize("shape", [(5, 3), (3, 2, 4, 5), (2, 2, 6, 7)])
def test_gradcheck(backend, shape):
    x = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    rm = torch.randn(shape[1], dtype=torch.float64, requires_grad=True)
    rv = (torch.rand(shape[1], dtype=torch.float64) + 0.5).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda a, b, c: bn_stats_loss(a, b, c, backend=backend), (x, rm, rv))


@pytest.mark.parametrize("backend", ["torch"] + cpu_backend_params())
def test_zero_norm_gradient_is_zero(backend):
    # integer planes made of +/- pairs: every plane and channel mean is exactly 0 in any order
    half = torch.randint(-3, 4, (6, 3, 4, 8), dtype=torch.float64)
    x = torch.cat([half, -half], dim=3).requires_grad_(True)
    v = batch_stats_reference(x.detach())[1]
    loss = bn_stats_loss(x, torch.zeros(3, dtype=torch.float64), v + 1.0, backend=backend)
    loss.backward()
    assert torch.isfinite(x.grad).all()
    xr = x.detach().clone().requires_grad_(True)
    (torch.linalg.vector_norm(batch_stats_reference(xr)[1] - v - 1.0)).backward()
    torch.testing.assert_close(x.grad, xr.grad)


@pytest.mark.parametrize("backend", cpu_backend_params())
def test_opcheck(backend):
    for shape, dt in [((4, 3, 5, 6), torch.float32), ((6, 5), torch.float64), ((2, 3, 9, 9), torch.float64)]:
        x = torch.randn(shape, dtype=dt, requires_grad=True)
        rm, rv = _stats(shape[1], dt)
        torch.library.opcheck(torch.ops.fastkd.bn_stats_fwd.default, (x, rm, rv))


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["torch"] + cpu_backend_params())
def test_torch_compile_fullgraph(backend):
    torch._dynamo.reset()
    rm, rv = _stats(3, torch.float32)

    def f(x):
        return 2.0 * bn_stats_loss(x.relu(), rm, rv, backend=backend) + x.square().mean()

    cf = torch.compile(f, fullgraph=True)
    x = torch.randn(4, 3, 6, 6, requires_grad=True)
    xr = x.detach().clone().requires_grad_(True)
    out = cf(x)
    out.backward()
    ref = f(xr)
    ref.backward()
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(x.grad, xr.grad)


# --------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("args,exc,match", [
    ((torch.randn(3, 4, 5), torch.zeros(4), torch.ones(4)), ValueError, "x must have shape"),
    ((torch.randn(3), torch.zeros(3), torch.ones(3)), ValueError, "x must have shape"),
    ((torch.ones(2, 3, dtype=torch.int64), torch.zeros(3), torch.ones(3)), TypeError, "x must be a floating"),
    ((torch.randn(2, 3), torch.zeros(4), torch.ones(3)), ValueError, r"running_mean must have shape \(3,\)"),
    ((torch.randn(2, 3), torch.zeros(3), torch.ones(3, 1)), ValueError, r"running_var must have shape \(3,\)"),
    ((torch.randn(2, 3), torch.zeros(3, dtype=torch.long), torch.ones(3)), TypeError, "running_mean must be a float"),
    ((torch.randn(0, 3), torch.zeros(3), torch.ones(3)), ValueError, "at least one element"),
    (([[1.0]], torch.zeros(1), torch.ones(1)), TypeError, "x must be a torch.Tensor"),
])
@pytest.mark.parametrize("backend", ["auto", "torch"])
def test_bad_input(args, exc, match, backend):
    with pytest.raises(exc, match=match):
        bn_stats_loss(*args, backend=backend)


# --------------------------------------------------------------------------- module
class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(1, 4, 3, padding=1)
        self.b1 = nn.BatchNorm2d(4)
        self.c2 = nn.Conv2d(4, 6, 3, padding=1)
        self.b2 = nn.BatchNorm2d(6)
        self.fc = nn.Linear(6, 8)
        self.b3 = nn.BatchNorm1d(8)
        self.out = nn.Linear(8, 3)

    def forward(self, x):
        x = self.b1(self.c1(x)).relu()
        x = self.b2(self.c2(x)).relu().mean((2, 3))
        return self.out(self.b3(self.fc(x)).relu())


def _warm(net):
    net.train()
    with torch.no_grad():
        for _ in range(3):
            net(torch.randn(16, 1, 6, 6))
    return net.eval()


def test_module_sums_every_bn_layer():
    net = _warm(_Net())
    feats = {}
    hooks = [m.register_forward_hook(lambda m, i, o, k=k: feats.__setitem__(k, i[0]))
             for k, m in (("b1", net.b1), ("b2", net.b2), ("b3", net.b3))]
    bn = BNStatsLoss(net)
    assert bn.num_layers == 3 and "layers=3" in repr(bn)
    x = torch.randn(5, 1, 6, 6, requires_grad=True)
    net(x)
    got = bn()
    want = sum(bn_stats_loss_reference(feats[k], getattr(net, k).running_mean, getattr(net, k).running_var)
               for k in ("b1", "b2", "b3"))
    torch.testing.assert_close(got, want)
    got.backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    with pytest.raises(RuntimeError, match="no term recorded"):
        bn()
    with bn.paused():
        net(x)
    with pytest.raises(RuntimeError, match="no term recorded"):
        bn()
    bn.remove()
    net(x)
    with pytest.raises(RuntimeError, match="no term recorded"):
        bn()
    for h in hooks:
        h.remove()


def test_module_without_batchnorm_raises():
    net = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.Flatten(), nn.LazyLinear(3))
    with pytest.raises(ValueError, match="no BatchNorm layer"):
        BNStatsLoss(net)
    with pytest.raises(ValueError, match="no BatchNorm layer"):
        BNStatsLoss(nn.Sequential(nn.BatchNorm2d(3, track_running_stats=False)))
    with pytest.raises(TypeError, match="teacher must be a torch.nn.Module"):
        BNStatsLoss("resnet")


# --------------------------------------------------------------------------- GPU
@pytest.mark.skipif(not HAS_CUDA, reason="no CUDA device on this machine")
@pytest.mark.parametrize("backend", gpu_backend_params())
@pytest.mark.parametrize("shape", SHAPES + [(256, 64, 16, 16)])
def test_gpu_backend_matches_reference(backend, shape):
    _check_backend(backend, "cuda", shape)


@pytest.mark.skipif(not HAS_CUDA, reason="no CUDA device on this machine")
@pytest.mark.parametrize("backend", gpu_backend_params())
@pytest.mark.parametrize("layout", sorted(NONCONTIG))
def test_gpu_backend_noncontiguous(backend, layout):
    _check_backend(backend, "cuda", (3, 4, 10, 13), make=NONCONTIG[layout])


@pytest.mark.skipif(not HAS_CUDA, reason="no CUDA device on this machine")
@pytest.mark.parametrize("backend", gpu_backend_params())
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gpu_backend_low_precision(backend, dtype):
    _low_precision_check(backend, "cuda", dtype)


@pytest.mark.skipif(not HAS_CUDA, reason="no CUDA device on this machine")
@pytest.mark.parametrize("backend", gpu_backend_params())
def test_gpu_fp32_large(backend):
    _check_backend(backend, "cuda", (256, 128, 32, 32), dtype=torch.float32, offset=3.0)


@pytest.mark.skipif(not HAS_CUDA, reason="no CUDA device on this machine")
def test_gpu_opcheck_and_compile():
    if not fastkd.backends()["cuda"].available:
        pytest.skip(fastkd.backends()["cuda"].reason)
    x = torch.randn(4, 3, 9, 7, device="cuda", requires_grad=True)
    rm, rv = _stats(3, torch.float32, "cuda")
    torch.library.opcheck(torch.ops.fastkd.bn_stats_fwd.default, (x, rm, rv))
    cf = torch.compile(lambda t: bn_stats_loss(t, rm, rv, backend="cuda"), fullgraph=True)
    torch.testing.assert_close(cf(x), bn_stats_loss_reference(x, rm, rv))
