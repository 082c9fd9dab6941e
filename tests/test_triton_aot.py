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


# --------------------------------------------------------------------------- launch arguments
def test_a_python_float_compiles_to_an_fp32_parameter():
    # Why no float64 kernel may take a Python float: compiled, the parameter is fp32 (the
    # interpreter keeps a double), so a float64 result is ~1e-7 relatively off on a GPU.
    import torch
    import triton.language as tl

    @triton.jit
    def _scale(x_ptr, s):
        tl.store(x_ptr, tl.load(x_ptr) * s)

    with aot.target_driver("cuda:90"):
        kernel = _scale.warmup(aot._Ptr(torch.float64, True), 0.1, grid=(1,))
    assert kernel.src.signature == {"x_ptr": "*fp64", "s": "fp32"}


def _computes_in_float64(ln) -> bool:
    import torch
    import triton.language as tl

    acc = ln.params.get("ACC")
    if acc is not None:
        return acc[1] == tl.float64
    return any(d[0] == "ptr" and d[1] == torch.float64 for d in ln.params.values())


# Kernels whose arithmetic is float32 by design whatever the input dtype (documented in
# their module): a float parameter is exact enough there.
FLOAT32_KERNELS = {("fastkd.ops._triton.gmm", "_gmm_kernel")}


def test_no_float64_kernel_takes_a_python_float():
    fresh, offset, errors = aot.record()
    assert errors == []
    checked, bad = 0, set()
    for ln in fresh + offset:
        if (ln.module, ln.kernel) in FLOAT32_KERNELS or not _computes_in_float64(ln):
            continue
        checked += 1
        bad.update(f"{ln.kernel}({name})" for name, d in ln.params.items()
                   if d[0] == "float" and name not in ln.constexprs)
    assert checked > 0
    assert sorted(bad) == []


def test_float64_kernels_are_listed():
    # every launch kernel with an ACC parameter or float64 buffers is checked above
    fresh, _, _ = aot.record()
    f64 = {ln.kernel for ln in fresh if _computes_in_float64(ln)}
    assert {"_tv_fwd_kernel", "_image_distance_kernel", "_grad_rows", "_step_kernel", "_step_tv_kernel",
            "_sqdist_kernel", "_bn_partial_kernel"} <= f64


def test_float64_bits_round_trip_through_a_compiled_kernel_signature():
    # the bit-pattern arguments compile to integer parameters, never fp32
    import struct

    from fastkd.ops._triton._launch import f64_bits

    for v in (0.1, -2.5, 0.0, -0.0, 1e-300, float("inf")):
        b = f64_bits(v)
        assert -2**63 <= b < 2**63
        assert struct.unpack("<d", struct.pack("<q", b))[0] == v or (v != v)
    (ln,) = _launches(_langevin_call(7, True))
    assert all(ln.params[n][0] == "int" for n in ("lr_b", "sd_b", "lo_b", "hi_b", "tvw_b", "terms"))


# --------------------------------------------------------------------------- launch device
class _DeviceRecorder:
    """Stands in for ``on_device`` in every Triton module: remembers which tensor's device
    is current while a kernel launches."""

    def __init__(self):
        self.current = None

    def __call__(self, t):
        import contextlib

        @contextlib.contextmanager
        def ctx():
            saved, self.current = self.current, t.device
            try:
                yield
            finally:
                self.current = saved
        return ctx()


def test_every_launch_runs_on_its_tensors_device(monkeypatch):
    import importlib

    from triton.runtime.jit import JITFunction

    rec = _DeviceRecorder()
    modules = {m for m, _ in aot.jit_functions()}
    for m in modules:
        mod = importlib.import_module(m)
        if hasattr(mod, "on_device"):
            monkeypatch.setattr(mod, "on_device", rec)
    seen = []

    def run(self, *args, grid, warmup, **kwargs):
        tensors = [a for a in list(args) + list(kwargs.values()) if hasattr(a, "data_ptr")]
        seen.append((self.fn.__name__, rec.current, {t.device for t in tensors}))

    monkeypatch.setattr(JITFunction, "run", run)
    t = aot._make_input(False)
    for fn in aot.CALLS.values():
        fn(t, False)
    assert {name for name, _, _ in seen} >= {"_tv_fwd_kernel", "_gmm_kernel", "_step_tv_kernel", "_grad_rows",
                                             "_backproject_kernel", "_bn_bwd_kernel"}
    outside = sorted({name for name, cur, devs in seen if cur is None or devs != {cur}})
    assert outside == []


def test_on_device_selects_the_tensors_cuda_device():
    import contextlib

    import torch

    from fastkd.ops._triton._launch import on_device

    class _OnCuda1:
        device = torch.device("cuda", 1)

    ctx = on_device(_OnCuda1())
    assert isinstance(ctx, torch.cuda.device) and ctx.idx == 1
    assert isinstance(on_device(torch.zeros(1)), contextlib.nullcontext)
