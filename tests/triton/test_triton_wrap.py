"""fastkd.ops._common.wrap_triton, through which every fastkd_triton op launches its kernels:
torch.library.wrap_triton for compiled kernels, the kernel itself when Triton's interpreter
runs it (which some torch releases, 2.11 among them, refuse to wrap)."""
import pytest
import torch
import triton
import triton.language as tl

from fastkd.ops._common import wrap_triton

from triton_env import DEVICE, INTERP, requires_triton

pytestmark = requires_triton


@triton.jit
def _add_one(x_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = offs < n
    tl.store(x_ptr + offs, tl.load(x_ptr + offs, mask=m) + 1.0, mask=m)


_add_one_tuned = triton.autotune(configs=[triton.Config({"BLOCK": 16})], key=["n"])(_add_one)


def test_wrapped_kernel_launches():
    x = torch.zeros(37, device=DEVICE)
    wrap_triton(_add_one)[(triton.cdiv(37, 16),)](x, 37, BLOCK=16)
    torch.testing.assert_close(x, torch.ones_like(x))


@pytest.mark.skipif(not INTERP, reason="needs Triton's interpreter (TRITON_INTERPRET=1)")
def test_interpreted_kernels_pass_through():
    assert wrap_triton(_add_one) is _add_one
    assert wrap_triton(_add_one_tuned) is _add_one_tuned
