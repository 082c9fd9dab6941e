"""The Triton kernels compile ahead of time for real GPU targets (tools/triton_aot.py).

Triton's CPU interpreter never compiles a kernel, so these tests compile them with the
CUDA backend for sm_90 / sm_80 (no GPU needed) through the same launch path a GPU call
takes. They run in the main invocation, without TRITON_INTERPRET.
"""
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

triton = pytest.importorskip("triton")

ROOT = Path(__file__).resolve().parents[1]
TOOL = ROOT / "tools" / "triton_aot.py"


def _load_tool():
    spec = importlib.util.spec_from_file_location("triton_aot", TOOL)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["triton_aot"] = mod
    spec.loader.exec_module(mod)
    return mod


aot = _load_tool()

pytestmark = pytest.mark.skipif(
    aot.interpreter_on(),
    reason="ahead-of-time compilation needs Triton's compiler, not its interpreter (TRITON_INTERPRET set)")


@pytest.fixture(autouse=True)
def _fresh_cache(tmp_path, monkeypatch):
    # Compile for real: no kernel from an earlier run's cache.
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path / "triton-cache"))


def _launches(call):
    """The kernel launches ``call()`` makes (recorded, not run)."""
    sink = []
    with aot._recording(sink):
        call()
    return sink


def _langevin_call(seed, tv):
    import torch
    from fastkd.ops._triton import langevin as m

    shape = (2, 3, 5, 7)
    x = torch.rand(shape)
    g = torch.rand(shape)
    return lambda: m.langevin_step_(x, g, None, 0.1, None, 0.3, False, 0.0, 0.0, 0.5 if tv else 0.0, 1, seed)


@pytest.mark.parametrize("target", ["cuda:90", "cuda:80"])
@pytest.mark.parametrize("tv", [False, True], ids=["plain", "tv"])
@pytest.mark.parametrize("seed", [1, 2**32, 2**32 + 1, 2**62 + 2**31 + 5],
                         ids=["k0=1", "k1=1", "k0=k1=1", "64-bit halves"])
def test_langevin_compiles_for_every_seed(seed, tv, target):
    # A seed half equal to 1 used to become a compile-time int (no .to()): every GPU
    # launch with such a seed failed to compile.
    (ln,) = _launches(_langevin_call(seed, tv))
    assert ln.kernel == ("_step_tv_kernel" if tv else "_step_kernel")
    assert (ln.params["k0"][1], ln.params["k1"][1]) == (seed & 0xFFFFFFFF, seed >> 32)
    kernel = aot.compile_launch(ln, target)
    assert kernel.asm.get("cubin")


def test_langevin_seed_halves_are_not_specialised():
    from fastkd.ops._triton import langevin as m

    for jf in (m._step_kernel, m._step_tv_kernel):
        flags = {p.name: p.do_not_specialize for p in jf.params}
        assert flags["k0"] and flags["k1"]


def test_table_reaches_every_kernel():
    fresh, offset, errors = aot.record()
    assert errors == []
    launched = {(ln.module, ln.kernel) for ln in fresh}
    assert aot.uncovered(launched) == []
    assert ("fastkd.ops._triton.langevin", "_step_tv_kernel") in launched
    # the offset run passes some inputs unaligned, so group "plain" has unaligned pointers
    assert any(not d[2] for ln in offset for d in ln.params.values() if d[0] == "ptr")


def test_uncovered_names_a_kernel_the_table_misses():
    fresh, _, _ = aot.record({"image_distance": aot.CALLS["image_distance"]})
    launched = {(ln.module, ln.kernel) for ln in fresh}
    missing = aot.uncovered(launched)
    assert ("fastkd.ops._triton.langevin", "_step_kernel") in missing
    # helpers reached from a launched kernel are not reported; those of unlaunched ones are
    assert ("fastkd.ops._triton.langevin", "_philox") in missing
    assert not any(m == "fastkd.ops._triton.image_distance" for m, _ in missing)


def test_groups_specialise_as_named():
    import torch

    (ln,) = _launches(_langevin_call(12345, False))
    one = ln.specialised("one", frozenset())
    i64 = ln.specialised("i64", frozenset())
    plain = ln.specialised("plain", frozenset({"x_ptr"}))
    assert one.params["numel"] == ("int", 1) and i64.params["numel"][1] >= 2**31
    assert plain.params["x_ptr"] == ("ptr", torch.float32, False)
    assert plain.params["g_ptr"] == ("ptr", torch.float32, True)
    assert one.params["ACC"] == ln.params["ACC"]


def test_tool_refuses_the_interpreter():
    env = dict(os.environ, TRITON_INTERPRET="1")
    r = subprocess.run([sys.executable, str(TOOL)], env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2
    assert "TRITON_INTERPRET" in r.stdout


@pytest.mark.slow
def test_tool_compiles_every_kernel_for_one_target():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, str(TOOL), "--target", "cuda:80"], env=env, capture_output=True,
                       text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith(("ok ", "FAIL "))]
    assert lines and all(ln.startswith("ok ") for ln in lines)
    assert "0 failed" in r.stdout
