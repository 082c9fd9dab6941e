"""pytest-benchmark: cross_class_contrastive forward+backward (`pytest benchmarks/ --benchmark-only`)."""
import pytest
import torch

import fastkd
from fastkd.bench.contrastive import naive_contrastive
from fastkd.ops import cross_class_contrastive

BACKENDS = ["torch"] + (["cpp"] if fastkd.backends()["cpp"].available else [])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("n", [1024, 4096])
def test_closed_form(benchmark, backend, n):
    p = torch.randn(n, 10, requires_grad=True)
    y = torch.randint(0, 10, (n,))

    def run():
        p.grad = None
        cross_class_contrastive(p, y, backend=backend).backward()

    benchmark(run)


@pytest.mark.parametrize("n", [1024])
def test_naive(benchmark, n):
    p = torch.randn(n, 10, requires_grad=True)
    y = torch.randint(0, 10, (n,))

    def run():
        p.grad = None
        naive_contrastive(p, y).backward()

    benchmark(run)
