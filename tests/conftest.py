import os

import pytest
import torch

import fastkd

HAS_CUDA = torch.cuda.is_available()
CUDA_SKIP = pytest.mark.skipif(not HAS_CUDA, reason="no CUDA device on this machine")


def fused_backends(device: str):
    """(backend, device) pairs of the compiled / Triton backends usable for ``device``."""
    out = []
    st = fastkd.backends()
    if device == "cpu":
        if st["cpp"].available:
            out.append("cpp")
        if st["triton"].available and os.environ.get("TRITON_INTERPRET") == "1":
            out.append("triton")
    else:
        for name in ("cuda", "triton"):
            if st[name].available:
                out.append(name)
    return out


def cpu_backend_params():
    """Parametrisation over every non-reference backend on the CPU, with skip reasons."""
    st = fastkd.backends()
    params = [pytest.param("cpp", marks=pytest.mark.skipif(not st["cpp"].available,
                                                          reason=f"cpp: {st['cpp'].reason}"))]
    return params


def gpu_backend_params():
    st = fastkd.backends()
    return [pytest.param(name, marks=pytest.mark.skipif(not st[name].available or not HAS_CUDA,
                                                       reason=f"{name}: {st[name].reason}"))
            for name in ("cuda", "triton")]


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def pytest_sessionstart(session):
    # CI sets FASTKD_REQUIRE_EXT=1: there a missing or stale extension is a failure, not a
    # reason to skip every compiled-backend test.
    if os.environ.get("FASTKD_REQUIRE_EXT") == "1" and not fastkd.backends()["cpp"].available:
        raise pytest.UsageError(f"FASTKD_REQUIRE_EXT=1 but {fastkd.backends()['cpp'].reason}")
