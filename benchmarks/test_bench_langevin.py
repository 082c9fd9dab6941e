"""pytest-benchmark: one Langevin step (`pytest benchmarks/ --benchmark-only`)."""
import pytest
import torch

import fastkd
from fastkd.bench.langevin import eager_step
from fastkd.ops import langevin_step_

BACKENDS = ["torch"] + (["cpp"] if fastkd.backends()["cpp"].available else [])


@pytest.mark.parametrize("backend", BACKENDS)
def test_fused(benchmark, backend):
    x, g = torch.randn(64, 3, 64, 64), torch.randn(64, 3, 64, 64)
    benchmark(lambda: langevin_step_(x, g, 1e-3, clamp=(-3.0, 3.0), backend=backend))


def test_eager(benchmark):
    x, g = torch.randn(64, 3, 64, 64), torch.randn(64, 3, 64, 64)
    benchmark(lambda: eager_step(x, g))
