"""Build decisions (setup.py), the extension's build tag and how an unusable extension is
reported: fastkd info, fastkd.backends(), a one-time warning, and the test-run guard."""
import importlib.util
import os
import subprocess
import sys
import types

import pytest

import fastkd
from fastkd import _backend as B

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _setup_module():
    spec = importlib.util.spec_from_file_location("fastkd_setup_under_test", os.path.join(ROOT, "setup.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)  # __name__ is not "__main__": setup() is not called
    return mod


def _fake_torch(cuda="13.0", gpus=()):
    t = types.SimpleNamespace(__version__="2.99.0", version=types.SimpleNamespace(cuda=cuda))
    t.cuda = types.SimpleNamespace(is_available=lambda: bool(gpus), device_count=lambda: len(gpus),
                                   get_device_capability=lambda i: gpus[i])
    return t


@pytest.fixture
def cuda_home(tmp_path):
    """A folder laid out as a CUDA toolkit (bin/nvcc); what nvcc answers is patched per test."""
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "nvcc").write_text("#!/bin/sh\n")
    return str(tmp_path)


@pytest.fixture
def setup_mod(monkeypatch):
    for v in ("FASTKD_FORCE_CUDA", "FASTKD_NO_CUDA", "TORCH_CUDA_ARCH_LIST"):
        monkeypatch.delenv(v, raising=False)
    return _setup_module()


def test_no_gpu_and_no_arch_list_builds_the_default_architectures(setup_mod, monkeypatch, capsys, cuda_home):
    # the case that used to die in torch's _get_cuda_arch_flags with IndexError
    monkeypatch.setattr(setup_mod, "_nvcc_version", lambda home: (13, 0))
    ok, archs = setup_mod._cuda_plan(_fake_torch(), types.SimpleNamespace(CUDA_HOME=cuda_home))
    assert ok and archs == setup_mod.DEFAULT_CUDA_ARCHS and "9.0" in archs
    assert os.environ["TORCH_CUDA_ARCH_LIST"] == archs
    assert "no GPU visible" in capsys.readouterr().out


def test_visible_gpus_and_explicit_arch_list(setup_mod, monkeypatch, cuda_home):
    monkeypatch.setattr(setup_mod, "_nvcc_version", lambda home: (13, 0))
    home = types.SimpleNamespace(CUDA_HOME=cuda_home)
    ok, archs = setup_mod._cuda_plan(_fake_torch(gpus=[(9, 0), (8, 0), (9, 0)]), home)
    assert ok and archs == "8.0;9.0"
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "8.6")
    assert setup_mod._cuda_plan(_fake_torch(gpus=[(9, 0)]), home) == (True, "8.6")


@pytest.mark.parametrize("torch_cuda,home,nvcc,why", [
    (None, "toolkit", (13, 0), "CPU-only build"),
    ("13.0", None, None, "no CUDA toolkit found"),
    ("13.0", "empty", None, "no CUDA toolkit found (no nvcc"),
    ("12.8", "toolkit", (13, 0), "does not match torch's CUDA 12.8"),
    ("13.0", "toolkit", None, "does not run"),
])
def test_cpu_only_build_says_why_in_one_line(setup_mod, monkeypatch, capsys, cuda_home, tmp_path,
                                             torch_cuda, home, nvcc, why):
    home = {"toolkit": cuda_home, "empty": str(tmp_path / "no-such-toolkit"), None: None}[home]
    monkeypatch.setattr(setup_mod, "_nvcc_version", lambda h: nvcc)
    ok, archs = setup_mod._cuda_plan(_fake_torch(cuda=torch_cuda), types.SimpleNamespace(CUDA_HOME=home))
    out = capsys.readouterr().out.strip().splitlines()
    assert not ok and why in archs  # the reason, compiled into the extension for `fastkd info`
    assert len(out) == 1 and why in out[0] and "CPU kernels only" in out[0]
    monkeypatch.setenv("FASTKD_FORCE_CUDA", "1")
    with pytest.raises(SystemExit, match="FASTKD_FORCE_CUDA=1 but CUDA kernels cannot be built"):
        setup_mod._cuda_plan(_fake_torch(cuda=torch_cuda), types.SimpleNamespace(CUDA_HOME=home))


def test_build_tag_is_read_from_the_file_without_loading_it(tmp_path):
    lib = tmp_path / "_C.so"
    lib.write_bytes(b"\x7fELF\0junk\0fastkd-build-tag torch=2.11.0+cu128 cuda_archs=8.0;9.0+PTX "
                    b"sources=0123456789abcdef\n\0more")
    assert B._read_build_tag(str(lib)) == {"torch": "2.11.0+cu128", "cuda_archs": "8.0;9.0+PTX",
                                           "sources": "0123456789abcdef"}
    (tmp_path / "old.so").write_bytes(b"\x7fELF no tag")
    assert B._read_build_tag(str(tmp_path / "old.so")) is None


@pytest.mark.skipif(B.extension_state() != "ok", reason=f"needs the built extension: {B.backend_status('cpp').reason}")
def test_the_built_extension_carries_its_tag():
    import importlib.util as u

    tag = B._read_build_tag(u.find_spec("fastkd._C").origin)
    info = B.extension_info()
    assert tag["torch"] == info["torch_version"] and tag["sources"] == info["source_hash"]
    assert (tag["cuda_archs"] != "") == bool(info["with_cuda"])


_STALE = r"""
import warnings, torch
torch.__version__ = "0.0.1"   # pretend another torch is running than the one fastkd._C was built for
import fastkd
from fastkd import _backend as B
print("STATE", B.extension_state())
print("CPP", fastkd.backends()["cpp"].reason)
x = torch.randn(2, 3, 4, 4)
with warnings.catch_warnings(record=True) as w:
    warnings.simplefilter("always")
    fastkd.ops.tv_loss(x)
    fastkd.ops.tv_loss(x)
print("WARNINGS", len([m for m in w if issubclass(m.category, fastkd.ExtensionWarning)]))
from fastkd.cli import main
main(["info"])
"""


@pytest.mark.skipif(B.extension_state() != "ok", reason=f"needs the built extension: {B.backend_status('cpp').reason}")
def test_an_extension_built_for_another_torch_is_loud_but_import_is_safe():
    r = subprocess.run([sys.executable, "-c", _STALE], capture_output=True, text=True, timeout=300,
                       env=dict(os.environ, FASTKD_BACKEND="auto"))
    assert r.returncode == 0, r.stderr[-2000:]
    out = r.stdout
    assert "STATE stale" in out
    assert f"built for torch {B.extension_info()['torch_version']} but torch 0.0.1" in out
    assert "pip install --no-build-isolation" in out and "WARNINGS 1" in out
    assert "fastkd._C" in out and "stale" in out.split("fastkd._C", 2)[-1]


def test_rebuild_command_names_this_python_and_the_source():
    cmd = B.rebuild_command()
    assert sys.executable in cmd and "--no-build-isolation" in cmd


def test_test_run_guard_refuses_a_missing_or_outdated_extension(monkeypatch):
    import conftest

    monkeypatch.setenv("FASTKD_REQUIRE_EXT", "1")
    monkeypatch.setattr(B, "_C_STATE", "stale")
    assert "meant to build fastkd._C but it is stale" in conftest.extension_problem()
    monkeypatch.setattr(B, "_C_STATE", "ok")
    monkeypatch.setattr(B, "_C_INFO", {"source_hash": "not-these-sources"})
    if os.path.dirname(os.path.dirname(os.path.abspath(fastkd.__file__))) == ROOT:
        assert "other sources than this checkout's csrc/" in conftest.extension_problem()
    monkeypatch.delenv("FASTKD_REQUIRE_EXT")
    monkeypatch.setattr(sys, "prefix", "/nonexistent")  # no set-up marker: nothing is required
    assert conftest.extension_problem() is None


def test_version_and_info(capsys):
    from fastkd.cli import main

    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.strip() == f"fastkd {fastkd.__version__}"
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    for word in ("fastkd", "torch", "triton", "GPUs", "fastkd._C", "backends:", "cpp", "cuda"):
        assert word in out
