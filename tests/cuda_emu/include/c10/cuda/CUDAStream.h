#pragma once
// Host emulation (tests/cuda_emu): launches are synchronous, the stream is a placeholder.
#include <cuda_runtime.h>
namespace c10 {
namespace cuda {
struct CUDAStream {
  cudaStream_t stream() const { return nullptr; }
};
inline CUDAStream getCurrentCUDAStream(int = -1) { return {}; }
}  // namespace cuda
}  // namespace c10
