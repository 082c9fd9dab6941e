// The Python module fastkd._C.
//
// Each op lives in its own files: its schema and CPU kernel in cpu/<op>.cpp
// (TORCH_LIBRARY_FRAGMENT(fastkd, m) + TORCH_LIBRARY_IMPL(fastkd, CPU, m)), its CUDA kernel
// in cuda/<op>.cu (TORCH_LIBRARY_IMPL(fastkd, CUDA, m)). Fake (meta) and autograd
// registrations are in fastkd/ops (Python), so torch.compile and torch.library.opcheck
// see every op.
#include <torch/extension.h>

#include "fastkd.h"

#ifndef FASTKD_TORCH_VERSION
#define FASTKD_TORCH_VERSION "unknown"
#endif

static pybind11::dict build_info() {
  pybind11::dict d;
  d["torch_version"] = FASTKD_TORCH_VERSION;
#ifdef FASTKD_WITH_CUDA
  d["with_cuda"] = true;
#else
  d["with_cuda"] = false;
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
