"""Backend discovery, selection and the extension fallback."""
import os
import subprocess
import sys

import pytest
import torch

import fastkd
from fastkd import _backend as B


def test_backends_reports_every_backend_with_a_reason():
    st = fastkd.backends()
    assert set(st) == {"cuda", "triton", "cpp", "torch"}
    assert st["torch"].available
    for s in st.values():
        assert isinstance(s.reason, str) and s.reason


def test_unknown_backend_is_a_value_error():
    with pytest.raises(ValueError, match="backend"):
        fastkd.ops.tv_loss(torch.randn(1, 1, 3, 3), backend="fortran")


def test_unavailable_backend_says_why():
    st = fastkd.backends()["cuda"]
    if st.available:
        pytest.skip("cuda is available here")
    with pytest.raises(fastkd.BackendUnavailableError, match="unavailable|CUDA"):
        fastkd.ops.tv_loss(torch.randn(1, 1, 3, 3), backend="cuda")


def test_cpp_backend_refuses_cuda_device_mismatch():
    if not fastkd.backends()["cpp"].available:
        pytest.skip(fastkd.backends()["cpp"].reason)
    with pytest.raises(fastkd.BackendUnavailableError, match="CPU"):
        B.resolve("tv_loss", "cpp", torch.device("cuda"))


def test_auto_prefers_compiled_on_cpu():
    expected = "cpp" if fastkd.backends()["cpp"].available else "torch"
    assert B.resolve("tv_loss", "auto", torch.device("cpu")) == expected


def test_env_overrides_auto(monkeypatch):
    monkeypatch.setenv("FASTKD_BACKEND", "torch")
    assert B.resolve("tv_loss", "auto", torch.device("cpu")) == "torch"
    monkeypatch.setenv("FASTKD_BACKEND", "nonsense")
    with pytest.raises(ValueError, match="FASTKD_BACKEND"):
        B.resolve("tv_loss", "auto", torch.device("cpu"))
    # an explicit backend argument is not overridden
    monkeypatch.setenv("FASTKD_BACKEND", "cuda")
    assert B.resolve("tv_loss", "torch", torch.device("cpu")) == "torch"


def test_import_without_extension_falls_back():
    code = ("import torch, fastkd\n"
            "st = fastkd.backends()\n"
            "assert not st['cpp'].available and 'FASTKD_DISABLE_EXT' in st['cpp'].reason, st\n"
            "x = torch.randn(2, 3, 5, 5, requires_grad=True)\n"
            "y = fastkd.ops.tv_loss(x)\n"
            "y.backward()\n"
            "print('ok', float(y))\n")
    env = dict(os.environ, FASTKD_DISABLE_EXT="1")
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("ok")


def test_extension_built_for_this_torch():
    if not B.has_extension():
        pytest.skip(B.backend_status("cpp").reason)
    assert B.extension_info()["torch_version"] == torch.__version__


def test_extension_for_another_torch_is_refused_with_reason():
    """A _C built against another torch must not be used; backends() says why."""
    code = ("import sys, types, torch\n"
            "fake = types.ModuleType('fastkd._C')\n"
            "fake.build_info = lambda: {'torch_version': '0.0.1', 'with_cuda': False, 'openmp': True}\n"
            "sys.modules['fastkd._C'] = fake\n"
            "import fastkd\n"
            "st = fastkd.backends()['cpp']\n"
            "assert not st.available and 'built for torch 0.0.1' in st.reason, st\n"
            "x = torch.randn(1, 2, 4, 4, requires_grad=True)\n"
            "fastkd.ops.tv_loss(x).backward()\n"
            "print('ok')\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().endswith("ok")


def test_every_expected_op_is_registered():
    if not B.has_extension():
        pytest.skip(B.backend_status("cpp").reason)
    for op in B.EXPECTED_OPS:
        assert hasattr(torch.ops.fastkd, op), op


def test_expected_ops_match_the_schemas_in_csrc():
    import glob
    import re

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    defs = set()
    for path in glob.glob(os.path.join(root, "csrc", "**", "*.cpp"), recursive=True):
        defs |= set(re.findall(r'm\.def\(\s*"([A-Za-z0-9_]+)\(', open(path).read()))
    assert defs, "no schemas found under csrc/"
    assert defs == set(B.EXPECTED_OPS)
