"""pytest-benchmark timings of bn_stats_loss (fwd+bwd) and gmm_select (not a timed test).

    PYTHONPATH=. python -m pytest benchmarks/test_bench_bn_stats.py --benchmark-only
"""
import pytest
import torch

import fastkd
from fastkd.bench.bn_stats import _eager_bn
from fastkd.ops import bn_stats_loss, gmm_select

pytest.importorskip("pytest_benchmark")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SHAPES = [(256, 64, 8, 8), (256, 128)]


def _backends():
    st = fastkd.backends()
    names = ["eager", "torch"]
    names += [b for b in (("cuda", "triton") if DEVICE == "cuda" else ("cpp",)) if st[b].available]
    return names


@pytest.mark.parametrize("impl", _backends())
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_bn_stats_fwd_bwd(benchmark, impl, shape):
    x = torch.randn(shape, device=DEVICE, requires_grad=True)
    rm = torch.zeros(shape[1], device=DEVICE)
    rv = torch.ones(shape[1], device=DEVICE)

    def step():
        x.grad = None
        loss = _eager_bn(x, rm, rv) if impl == "eager" else bn_stats_loss(x, rm, rv, backend=impl)
        loss.backward()
        if DEVICE == "cuda":
            torch.cuda.synchronize()

    benchmark(step)


@pytest.mark.parametrize("impl", ["sklearn", "torch"] + (["triton"] if DEVICE == "cuda" else []))
def test_gmm_select_1024(benchmark, impl):
    from fastkd.bench.gmm import _scores, _sklearn_select

    x = _scores(1024, DEVICE)
    if impl == "sklearn":
        pytest.importorskip("sklearn")
        benchmark(lambda: _sklearn_select(x))
    else:
        benchmark(lambda: gmm_select(x, backend=impl, nan_policy="omit"))
