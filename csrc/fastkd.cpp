// Operator schemas of the fastkd namespace and the Python module fastkd._C.
// Kernels live in cpu/ and cuda/; fake (meta) and autograd registrations are in
// fastkd/ops (Python), so torch.compile and torch.library.opcheck see every op.
#include "fastkd.h"

#ifndef FASTKD_TORCH_VERSION
#define FASTKD_TORCH_VERSION "unknown"
#endif

TORCH_LIBRARY(fastkd, m) {
  m.def("tv_loss_fwd(Tensor x, int p, bool diagonal, int reduction, bool need_grad) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(fastkd, CPU, m) {
  m.impl("tv_loss_fwd", &fastkd::tv_loss_fwd_cpu);
}

#ifdef FASTKD_WITH_CUDA
TORCH_LIBRARY_IMPL(fastkd, CUDA, m) {
  m.impl("tv_loss_fwd", &fastkd::tv_loss_fwd_cuda);
}
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
