"""pytest-benchmark suite for tv_loss (run: `pytest benchmarks --benchmark-only`).

The `fastkd bench` command covers the same comparisons with GB/s, ratios, CSV and plots;
this file lets pytest-benchmark users track the numbers over time.
"""
import pytest
import torch

import fastkd
from fastkd.ops import tv_loss

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SHAPE = (256, 3, 224, 224) if DEVICE == "cuda" else (64, 3, 64, 64)


def _eager(x):
    dh = x[:, :, 1:, :] - x[:, :, :-1, :]
    dw = x[:, :, :, 1:] - x[:, :, :, :-1]
    return (dh.abs().sum() + dw.abs().sum()) / (dh.numel() + dw.numel())


def _impls():
    out = {"eager": _eager, "compile": torch.compile(_eager)}
    for b in ("cpp", "cuda", "triton"):
        st = fastkd.backends()[b]
        if st.available and (b == "cpp") == (DEVICE == "cpu"):
            out[f"fastkd-{b}"] = lambda x, b=b: tv_loss(x, backend=b)
    return out


IMPLS = _impls()


@pytest.mark.parametrize("impl", sorted(IMPLS))
def test_tv_loss_fwd_bwd(benchmark, impl):
    x = torch.randn(SHAPE, device=DEVICE, requires_grad=True)
    f = IMPLS[impl]

    def step():
        x.grad = None
        f(x).backward()
        if DEVICE == "cuda":
            torch.cuda.synchronize()

    benchmark(step)
