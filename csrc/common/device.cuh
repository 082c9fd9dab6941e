#pragma once
// The two things CUDA sources of fastkd do differently from plain C++: launching a kernel
// and recognising a device tensor. Under nvcc, FKD_LAUNCH is the triple-chevron launch;
// in the host emulation that tests build from the same sources (FASTKD_CUDA_EMU, see
// tests/cuda_emu/README.md) it runs each block's threads as host threads, and device
// tensors are CPU tensors.
//
//   FKD_LAUNCH(grid, block, smem, stream, kernel<T, ...>)(args...);
//   FKD_DYNAMIC_SMEM(float, buf);   // extern __shared__ float buf[];
#include <ATen/core/Tensor.h>
#include <cuda_runtime.h>

#if defined(__CUDACC__)
#define FKD_LAUNCH(grid, block, smem, stream, ...) __VA_ARGS__<<<grid, block, smem, stream>>>
#define FKD_DYNAMIC_SMEM(type, name) extern __shared__ type name[]
#elif defined(FASTKD_CUDA_EMU)
#define FKD_LAUNCH(grid, block, smem, stream, ...) ::fkd_emu::launch(grid, block, smem, stream, __VA_ARGS__)
#define FKD_DYNAMIC_SMEM(type, name) type* name = ::fkd_emu::dynamic_smem<type>()
#else
#error "csrc/cuda sources compile with nvcc, or with FASTKD_CUDA_EMU for the host emulation"
#endif

namespace fastkd {
// Whether t lives on the device the kernels run on (a CPU tensor in the emulation).
inline bool on_device(const at::Tensor& t) {
#if defined(FASTKD_CUDA_EMU)
  return t.is_cpu();
#else
  return t.is_cuda();
#endif
}
}  // namespace fastkd
