"""Builds the host emulation of fastkd's CUDA sources (see README.md in this folder).

``library()`` compiles emu_ops.cpp (every csrc/cuda/*.cu, through include/cuda_runtime.h)
into a shared library with the ops ``torch.ops.fastkd_emu.*`` and loads it;
``tsan_binary()`` compiles tsan_main.cpp, the same sources under ThreadSanitizer, into an
executable. Builds are cached under build/cuda_emu/, keyed by a hash of the sources, the
flags and the torch version, so a second run in the same checkout costs nothing.
"""
from __future__ import annotations

import atexit
import glob
import hashlib
import os
import shutil
import signal
import subprocess
import sys
import sysconfig

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
CSRC = os.path.join(ROOT, "csrc")
OUT = os.path.join(ROOT, "build", "cuda_emu")
TORCH_DIR = os.path.dirname(torch.__file__)


def _compiler() -> str:
    cxx = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
    if not cxx:
        raise RuntimeError("the CUDA emulation needs a C++ compiler (g++): none found on PATH")
    return cxx


def _inputs() -> list[str]:
    files = glob.glob(os.path.join(CSRC, "*.h"))  # what emu_ops.cpp can include: not csrc/cpu
    files += glob.glob(os.path.join(CSRC, "common", "*")) + glob.glob(os.path.join(CSRC, "cuda", "*"))
    files += glob.glob(os.path.join(HERE, "**", "*.*"), recursive=True)
    return sorted(f for f in files if f.endswith((".h", ".cuh", ".cu", ".cpp")))



_PENDING: dict[str, tuple[subprocess.Popen, str, list[str]]] = {}  # path -> (compiler, tmp file, command)


def _start(kind: str, source: str, flags: list[str], out_name: str) -> str:
    """Start compiling (in the background) unless built or under way; returns the output path."""
    cmd_flags = ["-std=c++20", "-DFASTKD_CUDA_EMU", "-w", "-pthread",
                 "-I", os.path.join(HERE, "include"), "-I", CSRC,
                 "-isystem", os.path.join(TORCH_DIR, "include"),
                 "-isystem", os.path.join(TORCH_DIR, "include", "torch", "csrc", "api", "include")]
    libs = ["-L", os.path.join(TORCH_DIR, "lib"), f"-Wl,-rpath,{os.path.join(TORCH_DIR, 'lib')}",
            "-ltorch_cpu", "-lc10"]
    h = hashlib.sha256()
    for f in _inputs():
        h.update(f.encode())
        with open(f, "rb") as fh:
            h.update(fh.read())
    h.update(repr((kind, flags, torch.__version__, sysconfig.get_platform())).encode())
    folder = os.path.join(OUT, h.hexdigest()[:16])
    path = os.path.join(folder, out_name)
    if os.path.exists(path) or path in _PENDING:
        return path
    os.makedirs(folder, exist_ok=True)
    tmp = f"{path}.{os.getpid()}.tmp"
    cmd = [_compiler(), *cmd_flags, *flags, source, "-o", tmp, *libs]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)  # its own process group: see _stop_pending
    _PENDING[path] = (proc, tmp, cmd)
    return path


@atexit.register
def _stop_pending() -> None:
    """A run that never asked for the ThreadSanitizer build (pytest -k ...) leaves no compiler behind."""
    for proc, tmp, _ in _PENDING.values():
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # the compiler driver and cc1plus under it
        except ProcessLookupError:
            pass
        proc.wait()
        if os.path.exists(tmp):
            os.remove(tmp)


def _finish(path: str) -> str:
    if path in _PENDING:
        proc, tmp, cmd = _PENDING.pop(path)
        _, err = proc.communicate()
        if proc.returncode != 0:
            raise RuntimeError(f"building the CUDA emulation failed:\n{' '.join(cmd)}\n{err[-6000:]}")
        os.replace(tmp, path)
    return path


def _tsan_start() -> str:
    return _start("tsan", os.path.join(HERE, "tsan_main.cpp"), ["-O1", "-g", "-fsanitize=thread"], "tsan_main")


def library() -> str:
    """Path of the emulation library, built if needed and loaded into torch.ops.fastkd_emu.

    The ThreadSanitizer build starts alongside it (the two compile in parallel)."""
    path = _start("lib", os.path.join(HERE, "emu_ops.cpp"), ["-O1", "-fPIC", "-shared"], "fastkd_emu.so")
    _tsan_start()
    _finish(path)
    if not hasattr(torch.ops, "fastkd_emu") or not hasattr(torch.ops.fastkd_emu, "tv_loss_fwd"):
        torch.ops.load_library(path)
    return path


def tsan_binary() -> str:
    """Path of the ThreadSanitizer executable, built if needed."""
    return _finish(_tsan_start())


if __name__ == "__main__":
    print(library())
    if "--tsan" in sys.argv:
        print(tsan_binary())
