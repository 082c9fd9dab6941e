"""Triton backend of tv_loss. On a machine without a GPU these run in Triton's CPU
interpreter and must be run in their own invocation, with TRITON_INTERPRET=1 set before
fastkd (and triton) are imported:

    TRITON_INTERPRET=1 python -m pytest tests/triton
"""
import pytest
import torch

from fastkd.ops import tv_loss, tv_loss_reference

from triton_env import DEVICE, requires_triton

pytestmark = requires_triton


def _check(shape, p, diagonal, reduction, dtype=torch.float64, make=None):
    x = torch.randn(shape, dtype=dtype, device=DEVICE)
    if make is not None:
        x = make(x)
    x = x.detach().requires_grad_(True)
    xr = x.detach().clone().requires_grad_(True)
    got = tv_loss(x, p=p, diagonal=diagonal, reduction=reduction, backend="triton")
    want = tv_loss_reference(xr, p, diagonal, reduction)
    w = torch.randn(want.shape, dtype=dtype, device=DEVICE)
    (got * w).sum().backward()
    (want * w).sum().backward()
    tol = dict(rtol=1e-10, atol=1e-10) if dtype == torch.float64 else dict(rtol=2e-5, atol=1e-5)
    torch.testing.assert_close(got, want, **tol)
    torch.testing.assert_close(x.grad, xr.grad, **tol)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("p,diagonal", [(1, False), (1, True), (2, False), (2, True)])
@pytest.mark.parametrize("shape", [(1, 1, 2, 2), (3, 5, 7, 11), (2, 3, 1, 9), (2, 2, 9, 1), (2, 3, 40, 37)])
def test_triton_matches_reference(shape, p, diagonal, reduction):
    _check(shape, p, diagonal, reduction)


@pytest.mark.parametrize("make", [lambda x: x.contiguous(memory_format=torch.channels_last),
                                  lambda x: x[:, :, ::2, 1:]], ids=["channels_last", "sliced"])
def test_triton_noncontiguous(make):
    _check((3, 4, 10, 13), 1, True, "none", make=make)


def test_triton_fp32():
    _check((2, 3, 16, 16), 2, True, "mean", dtype=torch.float32)


def test_triton_opcheck():
    x = torch.randn(2, 3, 5, 6, dtype=torch.float64, device=DEVICE, requires_grad=True)
    from fastkd.ops._triton import tv  # noqa: F401

    # Fake-tensor and AOT checks trace the kernel launch, which Triton's CPU interpreter
    # cannot do; they run on a GPU.
    utils = ("test_schema", "test_autograd_registration") if DEVICE == "cpu" else \
        ("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")
    torch.library.opcheck(torch.ops.fastkd_triton.tv_loss_fwd.default, (x, 1, True, 1, True), test_utils=utils)
