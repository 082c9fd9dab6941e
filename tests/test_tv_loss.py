"""fastkd.ops.tv_loss: every backend against the PyTorch reference (the specification)."""
import itertools

import numpy as np
import pytest
import torch

import fastkd
from fastkd.ops import tv_loss, tv_loss_and_grad, tv_loss_reference, tv_num_terms

from conftest import HAS_CUDA, cpu_backend_params, gpu_backend_params

SHAPES = [(1, 1, 2, 2), (3, 5, 7, 11), (2, 3, 1, 9), (2, 2, 9, 1), (4, 3, 33, 65)]
CONFIGS = list(itertools.product((1, 2), (False, True), ("mean", "sum", "none")))


def naive_tv(x: np.ndarray, p, diagonal, reduction):
    """Loop-by-loop definition, independent of the reference's slicing."""
    N, C, H, W = x.shape
    per = np.zeros(N)
    terms = 0
    offsets = [(1, 0), (0, 1)] + ([(1, 1), (1, -1)] if diagonal else [])
    for n in range(N):
        for c in range(C):
            for h in range(H):
                for w in range(W):
                    for dh, dw in offsets:
                        if 0 <= h + dh < H and 0 <= w + dw < W:
                            d = x[n, c, h + dh, w + dw] - x[n, c, h, w]
                            per[n] += abs(d) if p == 1 else d * d
                            terms += 1
    if reduction == "none":
        return per
    return per.sum() / terms if reduction == "mean" else per.sum()


@pytest.mark.parametrize("p,diagonal,reduction", CONFIGS)
@pytest.mark.parametrize("shape", [(1, 1, 2, 2), (2, 3, 4, 5), (1, 2, 1, 4), (1, 1, 3, 1)])
def test_reference_matches_definition(shape, p, diagonal, reduction):
    x = torch.randn(shape, dtype=torch.float64)
    want = naive_tv(x.numpy(), p, diagonal, reduction)
    got = tv_loss_reference(x, p, diagonal, reduction)
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-12, atol=1e-12)
    if reduction == "mean":
        assert tv_num_terms(shape, diagonal) == round(naive_tv(x.numpy(), p, diagonal, "sum") / want) or want == 0


def _check_backend(backend, device, shape, p, diagonal, reduction, dtype=torch.float64, make=None):
    x = torch.randn(shape, dtype=dtype, device=device)
    if make is not None:
        x = make(x)
    x = x.detach().requires_grad_(True)
    xr = x.detach().clone().requires_grad_(True)
    got = tv_loss(x, p=p, diagonal=diagonal, reduction=reduction, backend=backend)
    want = tv_loss_reference(xr, p, diagonal, reduction)
    assert got.shape == want.shape and got.dtype == want.dtype
    w = torch.randn(want.shape, dtype=dtype, device=device)  # non-trivial upstream gradient
    (got * w).sum().backward()
    (want * w).sum().backward()
    tol = dict(rtol=1e-10, atol=1e-10) if dtype == torch.float64 else dict(rtol=2e-5, atol=1e-5)
    torch.testing.assert_close(got, want, **tol)
    torch.testing.assert_close(x.grad, xr.grad, **tol)


@pytest.mark.parametrize("backend", cpu_backend_params())
@pytest.mark.parametrize("p,diagonal,reduction", CONFIGS)
@pytest.mark.parametrize("shape", SHAPES)
def test_cpu_backend_matches_reference(backend, shape, p, diagonal, reduction):
    _check_backend(backend, "cpu", shape, p, diagonal, reduction)


@pytest.mark.parametrize("backend", cpu_backend_params())
@pytest.mark.parametrize("p,diagonal", [(1, False), (2, True)])
def test_cpu_backend_large_fp32(backend, p, diagonal):
    _check_backend(backend, "cpu", (16, 3, 128, 96), p, diagonal, "mean", dtype=torch.float32)


NONCONTIG = {
    "channels_last": lambda x: x.contiguous(memory_format=torch.channels_last),
    "sliced": lambda x: x[:, :, ::2, 1:],
    "transposed": lambda x: x.transpose(2, 3),
    "expanded": lambda x: x[:1].expand(3, -1, -1, -1),
}


@pytest.mark.parametrize("backend", cpu_backend_params())
@pytest.mark.parametrize("layout", sorted(NONCONTIG))
def test_cpu_backend_noncontiguous(backend, layout):
    _check_backend(backend, "cpu", (3, 4, 10, 13), 1, True, "none", make=NONCONTIG[layout])


def _low_precision_check(backend, device, dtype, p, diagonal):
    x64 = torch.randn(4, 3, 31, 29, dtype=torch.float64, device=device)
    x = x64.to(dtype)
    exact = x.double().detach().requires_grad_(True)
    ref_val = tv_loss_reference(exact, p, diagonal, "sum")
    ref_val.backward()
    xe = x.detach().clone().requires_grad_(True)
    eager = tv_loss_reference(xe, p, diagonal, "sum")
    eager.backward()
    xo = x.detach().clone().requires_grad_(True)
    ours = tv_loss(xo, p=p, diagonal=diagonal, reduction="sum", backend=backend)
    ours.backward()
    assert ours.dtype == dtype and xo.grad.dtype == dtype
    eager_err = (eager.double() - ref_val).abs().item()
    ours_err = (ours.double() - ref_val).abs().item()
    ulp = torch.finfo(dtype).eps * abs(ref_val.item())
    assert ours_err <= 2 * eager_err + ulp, (ours_err, eager_err)
    g_eager_err = (xe.grad.double() - exact.grad).abs().max().item()
    g_ours_err = (xo.grad.double() - exact.grad).abs().max().item()
    assert g_ours_err <= 2 * g_eager_err + torch.finfo(dtype).eps * exact.grad.abs().max().item()


@pytest.mark.parametrize("backend", cpu_backend_params())
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("p,diagonal", [(1, False), (2, True)])
def test_cpu_backend_low_precision(backend, dtype, p, diagonal):
    _low_precision_check(backend, "cpu", dtype, p, diagonal)


@pytest.mark.parametrize("backend", ["torch"] + cpu_backend_params())
@pytest.mark.parametrize("p,diagonal,reduction", [(1, False, "mean"), (2, True, "none"), (2, False, "sum")])
def test_gradcheck(backend, p, diagonal, reduction):
    # p=1 is not differentiable where neighbours are equal: random inputs avoid ties.
    x = torch.randn(2, 2, 4, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda t: tv_loss(t, p=p, diagonal=diagonal, reduction=reduction, backend=backend), (x,))


def test_sign_at_zero_matches_autograd():
    if not fastkd.backends()["cpp"].available:
        pytest.skip(fastkd.backends()["cpp"].reason)
    x = torch.zeros(1, 1, 4, 4, requires_grad=True)
    tv_loss(x, backend="cpp").backward()
    assert torch.equal(x.grad, torch.zeros_like(x))


@pytest.mark.parametrize("backend", ["torch"] + cpu_backend_params())
def test_loss_and_grad_matches_autograd(backend):
    x = torch.randn(3, 2, 8, 9, dtype=torch.float64)
    for reduction in ("mean", "none"):
        loss, g = tv_loss_and_grad(x, p=2, diagonal=True, reduction=reduction, backend=backend)
        xr = x.clone().requires_grad_(True)
        want = tv_loss_reference(xr, 2, True, reduction)
        want.sum().backward()
        torch.testing.assert_close(loss, want.detach())
        torch.testing.assert_close(g, xr.grad)


def test_no_grad_path_allocates_no_gradient():
    if not fastkd.backends()["cpp"].available:
        pytest.skip(fastkd.backends()["cpp"].reason)
    x = torch.randn(2, 3, 6, 6)
    loss, grad = torch.ops.fastkd.tv_loss_fwd(x, 1, False, 1, False)
    assert grad.numel() == 0
    torch.testing.assert_close(loss, tv_loss_reference(x))


def test_retain_graph_double_backward_is_consistent():
    x = torch.randn(2, 3, 6, 7, requires_grad=True)
    y = tv_loss(x)
    y.backward(retain_graph=True)
    g1 = x.grad.clone()
    y.backward()
    torch.testing.assert_close(x.grad, 2 * g1)


def test_module_wrapper():
    m = fastkd.nn.TVLoss(p=2, diagonal=True, reduction="sum")
    x = torch.randn(2, 3, 5, 5)
    torch.testing.assert_close(m(x), tv_loss_reference(x, 2, True, "sum"))
    assert "p=2" in repr(m)


@pytest.mark.parametrize("backend", cpu_backend_params())
def test_opcheck(backend):
    for args in [(torch.randn(2, 3, 5, 6), 1, False, 1, False),
                 (torch.randn(2, 3, 5, 6, dtype=torch.float64, requires_grad=True), 2, True, 0, True),
                 (torch.randn(1, 2, 4, 3, requires_grad=True), 1, True, 2, True)]:
        torch.library.opcheck(torch.ops.fastkd.tv_loss_fwd.default, args)


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["torch"] + cpu_backend_params())
def test_torch_compile_fullgraph(backend):
    torch._dynamo.reset()

    def f(x):
        return 3.0 * tv_loss(x, p=1, diagonal=True, reduction="mean", backend=backend) + x.square().mean()

    cf = torch.compile(f, fullgraph=True)
    x = torch.randn(2, 3, 8, 8, requires_grad=True)
    xr = x.detach().clone().requires_grad_(True)
    out = cf(x)
    out.backward()
    ref = f(xr)
    ref.backward()
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(x.grad, xr.grad)


# --------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("x,kwargs,exc,match", [
    (torch.randn(3, 4, 5), {}, ValueError, "x must have shape"),
    (torch.randn(1, 1, 1, 1), {}, ValueError, "H >= 2 or W >= 2"),
    (torch.ones(1, 1, 3, 3, dtype=torch.int64), {}, TypeError, "x must be a floating-point"),
    (torch.ones(1, 1, 3, 3, dtype=torch.bool), {}, TypeError, "x must be a floating-point"),
    (torch.randn(1, 1, 3, 3), {"p": 3}, ValueError, "p must be 1 or 2, got 3"),
    (torch.randn(1, 1, 3, 3), {"reduction": "avg"}, ValueError, "reduction must be one of"),
    (torch.randn(1, 1, 3, 3), {"diagonal": "yes"}, TypeError, "diagonal must be a bool"),
    (torch.randn(0, 1, 3, 3), {}, ValueError, "at least one sample"),
    ([[1.0]], {}, TypeError, "x must be a torch.Tensor"),
])
@pytest.mark.parametrize("backend", ["auto", "torch"])
def test_bad_input(x, kwargs, exc, match, backend):
    with pytest.raises(exc, match=match):
        tv_loss(x, backend=backend, **kwargs)


# --------------------------------------------------------------------------- CUDA / Triton on GPU
@pytest.mark.skipif(not HAS_CUDA, reason="no CUDA device on this machine")
@pytest.mark.parametrize("backend", gpu_backend_params())
@pytest.mark.parametrize("p,diagonal,reduction", CONFIGS)
@pytest.mark.parametrize("shape", SHAPES)
def test_gpu_backend_matches_reference(backend, shape, p, diagonal, reduction):
    _check_backend(backend, "cuda", shape, p, diagonal, reduction)


@pytest.mark.skipif(not HAS_CUDA, reason="no CUDA device on this machine")
@pytest.mark.parametrize("backend", gpu_backend_params())
@pytest.mark.parametrize("layout", sorted(NONCONTIG))
def test_gpu_backend_noncontiguous(backend, layout):
    _check_backend(backend, "cuda", (3, 4, 10, 13), 2, True, "none", make=NONCONTIG[layout])


@pytest.mark.skipif(not HAS_CUDA, reason="no CUDA device on this machine")
@pytest.mark.parametrize("backend", gpu_backend_params())
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_gpu_backend_low_precision(backend, dtype):
    _low_precision_check(backend, "cuda", dtype, 1, True)


@pytest.mark.skipif(not HAS_CUDA, reason="no CUDA device on this machine")
@pytest.mark.parametrize("backend", gpu_backend_params())
def test_gpu_large(backend):
    _check_backend(backend, "cuda", (64, 3, 224, 224), 1, False, "mean", dtype=torch.float32)


@pytest.mark.skipif(not HAS_CUDA, reason="no CUDA device on this machine")
def test_gpu_opcheck_and_compile():
    if not fastkd.backends()["cuda"].available:
        pytest.skip(fastkd.backends()["cuda"].reason)
    x = torch.randn(2, 3, 9, 7, device="cuda", requires_grad=True)
    torch.library.opcheck(torch.ops.fastkd.tv_loss_fwd.default, (x, 1, True, 1, True))
    cf = torch.compile(lambda t: tv_loss(t, backend="cuda"), fullgraph=True)
    torch.testing.assert_close(cf(x), tv_loss_reference(x))
