"""pytest-benchmark timings of the image-matching / Wasserstein ops (not timed tests:
run with `python -m pytest benchmarks/test_bench_ot.py --benchmark-only`)."""
import pytest
import torch

import fastkd
from fastkd.ops import image_distance, pairwise_sqdist, wasserstein

BACKENDS = ["torch"] + (["cpp"] if fastkd.backends()["cpp"].available else [])


@pytest.fixture
def data():
    g = torch.Generator().manual_seed(0)
    return torch.rand(64, 3072, generator=g), torch.rand(64, 3072, generator=g)


@pytest.mark.parametrize("backend", BACKENDS)
def test_image_distance(benchmark, data, backend):
    a = data[0].clone().requires_grad_(True)
    benchmark(lambda: image_distance(a, data[1], p=1, backend=backend).backward())


def test_cdist_squared(benchmark, data):
    a, b = data[0].clone().requires_grad_(True), data[1].clone().requires_grad_(True)
    benchmark(lambda: (torch.cdist(a, b) ** 2).sum().backward())


@pytest.mark.parametrize("backend", BACKENDS)
def test_pairwise_sqdist(benchmark, data, backend):
    a, b = data[0].clone().requires_grad_(True), data[1].clone().requires_grad_(True)
    benchmark(lambda: pairwise_sqdist(a, b, backend=backend).sum().backward())


@pytest.mark.parametrize("method", ["exact", "sinkhorn", "sliced"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_wasserstein(benchmark, data, method, backend):
    a = data[0].clone().requires_grad_(True)
    benchmark(lambda: wasserstein(a, data[1], method=method, seed=0, max_iter=30, backend=backend).backward())
