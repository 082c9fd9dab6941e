"""The CUDA kernels in the host emulation under ThreadSanitizer (tsan_main.cpp).

A clean run of every kernel, and the proof that the check can fail: with one barrier of
the TV-Langevin kernel turned into a no-op (FKD_EMU_SKIP_BARRIER), TSan reports the race
between the tile's reads of its neighbours and its writes.
"""
import os
import subprocess

import pytest

import emu_build

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _run(which: str, **env):
    e = dict(os.environ, OMP_NUM_THREADS="1", TSAN_OPTIONS="halt_on_error=0 exitcode=66", **env)
    return subprocess.run([emu_build.tsan_binary(), which], capture_output=True, text=True, env=e, timeout=600)


def test_every_kernel_is_race_free():
    res = _run("all")
    assert res.returncode == 0 and "ThreadSanitizer" not in res.stderr, res.stderr[-4000:]
    assert "ran all" in res.stdout


def _barrier_line(path: str, marker: str) -> int:
    with open(os.path.join(ROOT, path)) as f:
        lines = [i + 1 for i, line in enumerate(f) if "__syncthreads()" in line and marker in line]
    assert len(lines) == 1, f"no single barrier marked {marker!r} in {path}"
    return lines[0]


@pytest.mark.parametrize("path,marker,kernel", [
    ("csrc/cuda/langevin.cu", "every read of this tile", "langevin"),
    ("csrc/cuda/reduce.cuh", "__syncthreads();", "tv_loss"),
])
def test_a_missing_barrier_is_reported(path, marker, kernel):
    line = _barrier_line(path, marker)
    res = _run(kernel, FKD_EMU_SKIP_BARRIER=f"{os.path.basename(path)}:{line}")
    assert res.returncode == 66 and "WARNING: ThreadSanitizer: data race" in res.stderr, res.stderr[-4000:]
