"""Build script for fastkd's compiled extension ``fastkd._C``.

The extension always contains the C++ CPU kernels. CUDA kernels are added when torch is a
CUDA build and a CUDA toolkit of the same major version is found, for the architectures
in ``TORCH_CUDA_ARCH_LIST``, else those of the visible GPUs, else (a build node without a
GPU) ``DEFAULT_CUDA_ARCHS``. Without CUDA the build prints one line saying why.
``FASTKD_FORCE_CUDA=1`` makes a reason not to build CUDA kernels an error,
``FASTKD_NO_CUDA=1`` builds the CPU kernels only, ``FASTKD_SKIP_EXT=1`` installs the
pure-Python package only.

Build against the torch that is installed: ``pip install --no-build-isolation .``
"""
import glob
import os
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _flag(name):
    return os.environ.get(name, "0").strip().lower() in ("1", "true", "yes", "on")


def _locate_cuda_home():
    """Set CUDA_HOME when it is unset and nvcc on PATH is a wrapper outside the toolkit.

    torch guesses the toolkit root as nvcc's grandparent folder; when nvcc is a wrapper
    script (e.g. /usr/local/bin/nvcc) that root has no CUDA headers or libraries.
    """
    if os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH"):
        return
    import shutil

    def is_root(d):
        return os.path.isfile(os.path.join(d, "include", "cuda_runtime.h"))

    nvcc = shutil.which("nvcc")
    if nvcc and is_root(os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))):
        return
    for cand in ["/usr/local/cuda"] + sorted(glob.glob("/usr/local/cuda-*"), reverse=True):
        if is_root(cand):
            os.environ["CUDA_HOME"] = cand
            print(f"fastkd: using CUDA_HOME={cand}")
            return


# CUDA architectures compiled when no GPU is visible and TORCH_CUDA_ARCH_LIST is unset (a
# build node without a GPU building for GPU nodes): Ampere (sm_80 code also runs on sm_86
# and sm_89), Hopper, and PTX for compute_90 that the driver compiles for newer GPUs.
DEFAULT_CUDA_ARCHS = "8.0;9.0+PTX"


def _nvcc_version(cuda_home):
    """(major, minor) of the nvcc in cuda_home, or None."""
    import re
    import subprocess

    try:
        out = subprocess.run([os.path.join(cuda_home, "bin", "nvcc"), "--version"],
                             capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    m = re.search(r"release (\d+)\.(\d+)", out)
    return (int(m.group(1)), int(m.group(2))) if m else None


def _cuda_plan(torch, cpp_extension):
    """Decide whether CUDA kernels are compiled, and for which architectures.

    Returns (True, arch_list), or (False, why not). Without CUDA it prints one line saying
    why and how to get the CUDA kernels; with ``FASTKD_FORCE_CUDA=1`` that is an error.
    """
    force = _flag("FASTKD_FORCE_CUDA")
    why_not = None
    if _flag("FASTKD_NO_CUDA"):
        why_not = "FASTKD_NO_CUDA=1 is set"
    elif not torch.version.cuda:
        why_not = f"torch {torch.__version__} is a CPU-only build (install a CUDA build of torch)"
    elif cpp_extension.CUDA_HOME is None or not os.path.isfile(os.path.join(cpp_extension.CUDA_HOME, "bin", "nvcc")):
        why_not = ("no CUDA toolkit found (no nvcc; install a CUDA toolkit matching torch's CUDA "
                   f"{torch.version.cuda}, or set CUDA_HOME to one)")
    else:
        nvcc = _nvcc_version(cpp_extension.CUDA_HOME)
        want = int(torch.version.cuda.split(".")[0])
        if nvcc is None:
            why_not = f"nvcc in {cpp_extension.CUDA_HOME} does not run"
        elif nvcc[0] != want:
            why_not = (f"nvcc {nvcc[0]}.{nvcc[1]} (CUDA_HOME={cpp_extension.CUDA_HOME}) does not match "
                       f"torch's CUDA {torch.version.cuda}; point CUDA_HOME at a CUDA {want}.x toolkit")
    if why_not is not None:
        if force:
            sys.exit(f"fastkd: FASTKD_FORCE_CUDA=1 but CUDA kernels cannot be built: {why_not}")
        if not _flag("FASTKD_NO_CUDA"):
            print(f"fastkd: building the CPU kernels only, without CUDA kernels: {why_not}; "
                  "then rebuild with `pip install --no-build-isolation .`")
        else:
            print("fastkd: building the CPU kernels only (FASTKD_NO_CUDA=1)")
        return False, why_not
    archs = os.environ.get("TORCH_CUDA_ARCH_LIST", "").strip()
    if archs:
        origin = "TORCH_CUDA_ARCH_LIST"
    else:
        caps = sorted({torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())}
                      if torch.cuda.is_available() else set())
        if caps:
            archs, origin = ";".join(f"{a}.{b}" for a, b in caps), "the visible GPUs"
        else:
            archs, origin = DEFAULT_CUDA_ARCHS, "no GPU visible: fastkd's default"
        # torch's build reads the list from the environment; without it and without a GPU
        # it fails (IndexError in _get_cuda_arch_flags)
        os.environ["TORCH_CUDA_ARCH_LIST"] = archs
    print(f"fastkd: building CPU + CUDA kernels for CUDA architectures {archs} ({origin}; "
          "set TORCH_CUDA_ARCH_LIST to choose, FASTKD_NO_CUDA=1 to skip them)")
    return True, archs


def _source_hash() -> str:
    import importlib.util

    spec = importlib.util.spec_from_file_location("_fastkd_srchash", os.path.join(ROOT, "fastkd", "_srchash.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.source_hash(os.path.join(ROOT, "csrc"))


def _c_string(text: str) -> str:
    return text.replace("\\", "\\\\").replace('"', '\\"')


def _write_build_tag(torch_version: str, archs: str, no_cuda_reason: str) -> str:
    """Write fastkd_build_tag.h (read by csrc/fastkd.cpp only) into a generated-headers folder.

    A header rather than -D flags: flags are shared by every source file, so a change of
    the sources' fingerprint would recompile all of them; the header recompiles one.
    """
    folder = os.path.join(ROOT, "build", "generated")
    os.makedirs(folder, exist_ok=True)
    text = (f'#define FASTKD_TORCH_VERSION "{torch_version}"\n'
            f'#define FASTKD_CUDA_ARCHS "{archs}"\n'
            f'#define FASTKD_SOURCE_HASH "{_source_hash()}"\n'
            f'#define FASTKD_NO_CUDA_REASON "{_c_string(no_cuda_reason)}"\n')
    path = os.path.join(folder, "fastkd_build_tag.h")
    try:
        with open(path) as f:
            same = f.read() == text
    except OSError:
        same = False
    if not same:  # rewritten only when it changes, so that unchanged builds stay incremental
        with open(path, "w") as f:
            f.write(text)
    return folder


def _extensions():
    if _flag("FASTKD_SKIP_EXT"):
        print("fastkd: FASTKD_SKIP_EXT=1, installing without the compiled extension")
        return [], {}
    _locate_cuda_home()
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError:  # pragma: no cover - build environment problem
        sys.exit(
            "fastkd: torch is not importable in the build environment. fastkd compiles "
            "against the torch you have installed: install torch first, then run "
            "`pip install --no-build-isolation .` (or set FASTKD_SKIP_EXT=1)."
        )

    sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
    sources += sorted(glob.glob(os.path.join("csrc", "cpu", "*.cpp")))
    cuda_sources = sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")))

    with_cuda, plan = _cuda_plan(torch, cpp_extension)
    archs, no_cuda_reason = (plan, "") if with_cuda else ("", plan)
    # -fno-math-errno: nothing here reads errno, and without it sqrt() cannot vectorise.
    # -fno-trapping-math: nothing here enables floating-point traps, and without it a
    # conditional such as a clamp keeps a loop scalar ("control flow in loop"). Neither
    # changes any computed value (unlike -ffast-math, which would reassociate sums).
    cxx = ["-O3", "-fopenmp" if sys.platform != "darwin" else "-O3", "-fno-math-errno", "-fno-trapping-math"]
    generated = _write_build_tag(torch.__version__, archs, no_cuda_reason)
    define_macros = []
    extra = {"cxx": cxx}
    if with_cuda:
        sources += cuda_sources
        define_macros.append(("FASTKD_WITH_CUDA", None))
        extra["nvcc"] = ["-O3", "--use_fast_math", "-lineinfo", "--expt-relaxed-constexpr"]
        ext_cls = cpp_extension.CUDAExtension
    else:
        ext_cls = cpp_extension.CppExtension
    ext = ext_cls(
        name="fastkd._C",
        sources=sources,
        include_dirs=[os.path.join(ROOT, "csrc"), generated],
        define_macros=define_macros,
        extra_compile_args=extra,
        extra_link_args=["-fopenmp"] if sys.platform != "darwin" else [],
    )
    return [ext], {"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)}


if __name__ == "__main__":
    ext_modules, cmdclass = _extensions()
    setup(ext_modules=ext_modules, cmdclass=cmdclass)
