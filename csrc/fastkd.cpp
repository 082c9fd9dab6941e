// The Python module fastkd._C.
//
// Each op lives in its own files: its schema and CPU kernel in cpu/<op>.cpp
// (TORCH_LIBRARY_FRAGMENT(fastkd, m) + TORCH_LIBRARY_IMPL(fastkd, CPU, m)), its CUDA kernel
// in cuda/<op>.cu (TORCH_LIBRARY_IMPL(fastkd, CUDA, m)). Fake (meta) and autograd
// registrations are in fastkd/ops (Python), so torch.compile and torch.library.opcheck
// see every op.
#include <torch/extension.h>

#include "fastkd.h"

// Written by setup.py: the torch version, CUDA architectures and sources' fingerprint.
#if defined(__has_include)
#if __has_include("fastkd_build_tag.h")
#include "fastkd_build_tag.h"
#endif
#endif

#ifndef FASTKD_TORCH_VERSION
#define FASTKD_TORCH_VERSION "unknown"
#endif
#ifndef FASTKD_CUDA_ARCHS
#define FASTKD_CUDA_ARCHS "unknown"
#endif
#ifndef FASTKD_NO_CUDA_REASON
#define FASTKD_NO_CUDA_REASON ""
#endif
#ifndef FASTKD_SOURCE_HASH
#define FASTKD_SOURCE_HASH "unknown"
#endif

// Read by fastkd/_backend.py from the file, before the library is loaded, so that an
// extension built for another torch is reported instead of being loaded against it.
extern "C" __attribute__((used, visibility("default"))) const char fastkd_build_tag[] =
    "fastkd-build-tag torch=" FASTKD_TORCH_VERSION " cuda_archs=" FASTKD_CUDA_ARCHS
    " sources=" FASTKD_SOURCE_HASH "\n";

static pybind11::dict build_info() {
  pybind11::dict d;
  d["torch_version"] = FASTKD_TORCH_VERSION;
  d["source_hash"] = FASTKD_SOURCE_HASH;
#ifdef FASTKD_WITH_CUDA
  d["with_cuda"] = true;
  d["cuda_archs"] = FASTKD_CUDA_ARCHS;
#else
  d["with_cuda"] = false;
  d["cuda_archs"] = "";
  d["no_cuda_reason"] = FASTKD_NO_CUDA_REASON;  // what the build printed
#endif
#ifdef _OPENMP
  d["openmp"] = true;
#else
  d["openmp"] = false;
#endif
  return d;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "fastkd compiled kernels (C++ CPU and, when built with it, CUDA)";
  m.def("build_info", &build_info, "How this extension was built");
}
