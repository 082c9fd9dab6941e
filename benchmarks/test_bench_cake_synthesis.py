"""pytest-benchmark: one CAKE synthesis step, fastkd vs the eager authors' loop (LeNet-5, CPU).

Run: PYTHONPATH=. python -m pytest benchmarks/test_bench_cake_synthesis.py --benchmark-only
"""
import pytest

from fastkd.bench.cake_synthesis import _cases


@pytest.fixture(scope="module")
def case():
    return _cases("cpu", quick=True)[0]


@pytest.mark.parametrize("impl", ["fastkd", "eager"])
def test_cake_step(benchmark, case, impl):
    benchmark.group = f"cake_synthesis {case.shape}"
    benchmark(case.impls[impl])
