"""Build script for fastkd's compiled extension ``fastkd._C``.

The extension always contains the C++ CPU kernels. CUDA kernels are added when torch
was built with CUDA and nvcc is found, or when ``FASTKD_FORCE_CUDA=1`` (which honours
``TORCH_CUDA_ARCH_LIST``; useful to check that CUDA sources compile on a machine
without a GPU). ``FASTKD_NO_CUDA=1`` builds the CPU kernels only; ``FASTKD_SKIP_EXT=1``
installs the pure-Python package only.

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

    force_cuda = _flag("FASTKD_FORCE_CUDA")
    have_nvcc = cpp_extension.CUDA_HOME is not None
    no_cuda = _flag("FASTKD_NO_CUDA")  # CPU-only build on a CUDA toolkit machine (faster builds)
    with_cuda = bool(torch.version.cuda) and have_nvcc and (force_cuda or not no_cuda)
    if force_cuda and not with_cuda:
        sys.exit(
            "fastkd: FASTKD_FORCE_CUDA=1 but CUDA cannot be compiled "
            f"(torch.version.cuda={torch.version.cuda!r}, CUDA_HOME={cpp_extension.CUDA_HOME!r})"
        )

    # -fno-math-errno: nothing here reads errno, and without it sqrt() cannot vectorise.
    # -fno-trapping-math: nothing here enables floating-point traps, and without it a
    # conditional such as a clamp keeps a loop scalar ("control flow in loop"). Neither
    # changes any computed value (unlike -ffast-math, which would reassociate sums).
    cxx = ["-O3", "-fopenmp" if sys.platform != "darwin" else "-O3", "-fno-math-errno", "-fno-trapping-math",
           f"-DFASTKD_TORCH_VERSION=\"{torch.__version__}\""]
    define_macros = []
    extra = {"cxx": cxx}
    if with_cuda:
        sources += cuda_sources
        define_macros.append(("FASTKD_WITH_CUDA", None))
        extra["nvcc"] = ["-O3", "--use_fast_math", "-lineinfo", "--expt-relaxed-constexpr",
                         f"-DFASTKD_TORCH_VERSION=\"{torch.__version__}\""]
        ext_cls = cpp_extension.CUDAExtension
        print(f"fastkd: building CPU + CUDA kernels (TORCH_CUDA_ARCH_LIST="
              f"{os.environ.get('TORCH_CUDA_ARCH_LIST', '<auto>')})")
    else:
        ext_cls = cpp_extension.CppExtension
        print("fastkd: building CPU kernels only "
              f"(torch.version.cuda={torch.version.cuda!r}, nvcc found={have_nvcc})")
    ext = ext_cls(
        name="fastkd._C",
        sources=sources,
        include_dirs=[os.path.join(ROOT, "csrc")],
        define_macros=define_macros,
        extra_compile_args=extra,
        extra_link_args=["-fopenmp"] if sys.platform != "darwin" else [],
    )
    return [ext], {"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
