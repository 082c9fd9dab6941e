#pragma once
// Block-wide sum shared by the CUDA kernels: warp shuffles, then one warp over the
// per-warp partials. Every thread must call it; the result is valid in thread 0.
// Call it at most once per kernel (it uses one static shared buffer per type).
#include <cuda_runtime.h>

namespace fastkd {
namespace cuda {

template <typename T>
__device__ __forceinline__ T block_sum(T v) {
  __shared__ T warp_sums[32];
  for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(0xffffffffu, v, o);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (lane == 0) warp_sums[warp] = v;
  __syncthreads();
  const int nw = (blockDim.x + 31) >> 5;
  v = threadIdx.x < nw ? warp_sums[threadIdx.x] : T(0);
  if (warp == 0)
    for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(0xffffffffu, v, o);
  return v;
}

}  // namespace cuda
}  // namespace fastkd
