"""fastkd.ops.image_distance: every backend against the PyTorch reference and a numpy definition."""
import numpy as np
import pytest
import torch

import fastkd
from fastkd.ops import image_distance, image_distance_reference

from conftest import HAS_CUDA, cpu_backend_params, gpu_backend_params

SHAPES = [(1, 1), (3, 7), (4, 3, 5, 6), (2, 3, 33, 65), (5, 20000)]
CONFIGS = [(p, r) for p in (1, 2) for r in ("mean", "sum", "none")]


def numpy_definition(a, b, p, reduction):
    d = (a - b).reshape(a.shape[0], -1)
    per = np.abs(d).mean(1) if p == 1 else (d * d).sum(1)
    return {"none": per, "sum": per.sum(), "mean": per.mean()}[reduction]


@pytest.mark.parametrize("p,reduction", CONFIGS)
def test_reference_matches_definition(p, reduction):
    a, b = torch.randn(4, 3, 5, dtype=torch.float64), torch.randn(4, 3, 5, dtype=torch.float64)
    np.testing.assert_allclose(image_distance_reference(a, b, p, reduction).numpy(),
                               numpy_definition(a.numpy(), b.numpy(), p, reduction), rtol=1e-12)


def _check(backend, device, shape, p, reduction, dtype=torch.float64, make=None):
    a = torch.randn(shape, dtype=dtype, device=device)
    b = torch.randn(shape, dtype=dtype, device=device)
    if make is not None:
        a, b = make(a), make(b)
    a, b = a.detach().requires_grad_(True), b.detach().requires_grad_(True)
    ar, br = a.detach().clone().requires_grad_(True), b.detach().clone().requires_grad_(True)
    got = image_distance(a, b, p=p, reduction=reduction, backend=backend)
    want = image_distance_reference(ar, br, p, reduction)
    assert got.shape == want.shape and got.dtype == want.dtype
    w = torch.randn(want.shape, dtype=dtype, device=device)
    (got * w).sum().backward()
    (want * w).sum().backward()
    tol = dict(rtol=1e-10, atol=1e-10) if dtype == torch.float64 else dict(rtol=2e-5, atol=1e-5)
    torch.testing.assert_close(got, want, **tol)
    torch.testing.assert_close(a.grad, ar.grad, **tol)
    torch.testing.assert_close(b.grad, br.grad, **tol)


@pytest.mark.parametrize("backend", ["torch"] + cpu_backend_params())
@pytest.mark.parametrize("p,reduction", CONFIGS)
@pytest.mark.parametrize("shape", SHAPES)
def test_cpu_backends_match_reference(backend, shape, p, reduction):
    _check(backend, "cpu", shape, p, reduction)


@pytest.mark.parametrize("backend", cpu_backend_params())
@pytest.mark.parametrize("p", [1, 2])
def test_cpu_fp32(backend, p):
    _check(backend, "cpu", (8, 3, 64, 64), p, "mean", dtype=torch.float32)


@pytest.mark.parametrize("backend", cpu_backend_params())
@pytest.mark.parametrize("make", [lambda x: x.transpose(1, 2), lambda x: x[:, :, ::2],
                                  lambda x: x[:1].expand(3, -1, -1)], ids=["transposed", "sliced", "expanded"])
def test_noncontiguous(backend, make):
    _check(backend, "cpu", (3, 6, 10), 1, "none", make=make)


@pytest.mark.parametrize("backend", cpu_backend_params())
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision(backend, dtype):
    a64, b64 = torch.randn(4, 3, 31, 29, dtype=torch.float64), torch.randn(4, 3, 31, 29, dtype=torch.float64)
    a, b = a64.to(dtype), b64.to(dtype)
    exact = image_distance_reference(a.double(), b.double(), 2, "sum")
    ours = image_distance(a, b, p=2, reduction="sum", backend=backend)
    eager = ((a - b).float() ** 2).sum()
    assert ours.dtype == dtype
    tol = torch.finfo(dtype).eps * exact.item()
    assert abs(ours.double().item() - exact.item()) <= 2 * abs(eager.double().item() - exact.item()) + tol


@pytest.mark.parametrize("backend", ["torch"] + cpu_backend_params())
@pytest.mark.parametrize("p,reduction", [(1, "mean"), (2, "none"), (2, "sum")])
def test_gradcheck(backend, p, reduction):
    a = torch.randn(3, 2, 5, dtype=torch.float64, requires_grad=True)
    b = torch.randn(3, 2, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, y: image_distance(x, y, p=p, reduction=reduction, backend=backend),
                                    (a, b))


def test_only_b_requires_grad():
    a = torch.randn(3, 8)
    b = torch.randn(3, 8, requires_grad=True)
    image_distance(a, b, p=2).backward()
    torch.testing.assert_close(b.grad, -2 * (a - b.detach()) / 3)


@pytest.mark.parametrize("backend", cpu_backend_params())
def test_opcheck(backend):
    for args in [(torch.randn(2, 3, 5), torch.randn(2, 3, 5), 1, 1, False),
                 (torch.randn(3, 7, dtype=torch.float64, requires_grad=True),
                  torch.randn(3, 7, dtype=torch.float64, requires_grad=True), 2, 0, True)]:
        torch.library.opcheck(torch.ops.fastkd.image_distance_fwd.default, args)


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["torch"] + cpu_backend_params())
def test_torch_compile_fullgraph(backend):
    torch._dynamo.reset()

    def f(x, y):
        return image_distance(x, y, p=1, backend=backend) + x.square().mean()

    cf = torch.compile(f, fullgraph=True)
    x = torch.randn(3, 4, 5, requires_grad=True)
    y = torch.randn(3, 4, 5)
    xr = x.detach().clone().requires_grad_(True)
    out = cf(x, y)
    out.backward()
    ref = f(xr, y)
    ref.backward()
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(x.grad, xr.grad)


@pytest.mark.parametrize("kwargs,match", [
    (dict(a=torch.randn(2, 3), b=torch.randn(2, 4)), "b must have the same shape"),
    (dict(a=torch.randn(2, 3), b=torch.randn(3, 3)), "b must have the same shape"),
    (dict(a=torch.randn(0, 3), b=torch.randn(0, 3)), "a must hold at least one sample"),
    (dict(a=torch.ones(2, 3, dtype=torch.int64), b=torch.ones(2, 3, dtype=torch.int64)), "a must be a floating"),
    (dict(a=torch.randn(2, 3), b=torch.randn(2, 3, dtype=torch.float64)), "same dtype"),
    (dict(a=torch.randn(2, 3), b=torch.randn(2, 3), p=3), "p must be 1 or 2"),
    (dict(a=torch.randn(2, 3), b=torch.randn(2, 3), reduction="max"), "reduction must be"),
    (dict(a=torch.randn(2, 3), b=torch.randn(2, 3), backend="gpu"), "backend must be"),
])
def test_bad_input(kwargs, match):
    a, b = kwargs.pop("a"), kwargs.pop("b")
    with pytest.raises((ValueError, TypeError), match=match):
        image_distance(a, b, **kwargs)


@pytest.mark.skipif(not HAS_CUDA, reason="no CUDA device on this machine")
@pytest.mark.parametrize("backend", gpu_backend_params())
@pytest.mark.parametrize("p,reduction", CONFIGS)
def test_gpu_backends(backend, p, reduction):
    for shape in [(3, 7), (4, 3, 33, 65)]:
        _check(backend, "cuda", shape, p, reduction)
    _check(backend, "cuda", (8, 3, 64, 64), p, reduction, dtype=torch.float32)
