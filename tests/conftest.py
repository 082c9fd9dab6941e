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


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _extension_required() -> bool:
    """True when the set-up was meant to build fastkd._C: tools/setup.sh leaves a marker in
    the environment it built (FASTKD_SKIP_EXT=1 set-ups mark it false), CI may also set
    FASTKD_REQUIRE_EXT=1."""
    import json
    import sys

    if os.environ.get("FASTKD_REQUIRE_EXT") == "1":
        return True
    try:
        with open(os.path.join(sys.prefix, "fastkd-setup.json")) as f:
            return bool(json.load(f).get("extension"))
    except (OSError, ValueError):
        return False


def extension_problem():
    """Why the set-up's extension cannot be tested (one line), or None."""
    from fastkd import _backend as B
    from fastkd._srchash import source_hash

    if not _extension_required():
        return None
    if B.extension_state() != "ok":
        return (f"the set-up was meant to build fastkd._C but it is {B.extension_state()}: "
                f"{B.backend_status('cpp').reason}")
    here = os.path.dirname(os.path.dirname(os.path.abspath(fastkd.__file__))) == ROOT
    built = B.extension_info().get("source_hash")
    if here and os.path.isdir(os.path.join(ROOT, "csrc")) and built != source_hash(os.path.join(ROOT, "csrc")):
        return ("fastkd._C was built from other sources than this checkout's csrc/ (edited since the "
                f"build?); rebuild with `{B.rebuild_command()}` or rerun `bash tools/setup.sh`")
    return None


def pytest_sessionstart(session):
    # A missing, stale or outdated extension after a set-up that was meant to build it is a
    # failure of the run, not a reason to skip every compiled-backend test.
    problem = extension_problem()
    if problem:
        raise pytest.UsageError(problem)
