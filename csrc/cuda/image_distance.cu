// Paired image distance on CUDA: loss and d loss / d a in one pass over a and b.
//
// grid = (blocks per sample, N); grid-stride loops over each sample's D values; loss
// partials are reduced in the block and written per (sample, block), then summed in a
// fixed order: deterministic, no atomics.
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>

#include "common/device.cuh"

#include "fastkd.h"
#include "cuda/reduce.cuh"
#include "ot.h"

namespace fastkd {
namespace {

template <typename scalar_t, typename acc_t, int P, bool GRAD>
__global__ void __launch_bounds__(256) image_distance_kernel(const scalar_t* __restrict__ a,
                                                             const scalar_t* __restrict__ b,
                                                             scalar_t* __restrict__ g,
                                                             acc_t* __restrict__ partial, int64_t D,
                                                             acc_t gscale) {
  const int64_t n = blockIdx.y;
  const scalar_t* __restrict__ ap = a + n * D;
  const scalar_t* __restrict__ bp = b + n * D;
  acc_t acc = acc_t(0);
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < D;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const acc_t d = static_cast<acc_t>(__ldg(ap + i)) - static_cast<acc_t>(__ldg(bp + i));
    if constexpr (P == 1) {
      acc += fabs(d);
      if (GRAD) g[n * D + i] = static_cast<scalar_t>(gscale * (static_cast<acc_t>(d > acc_t(0)) -
                                                               static_cast<acc_t>(d < acc_t(0))));
    } else {
      acc += d * d;
      if (GRAD) g[n * D + i] = static_cast<scalar_t>(gscale * acc_t(2) * d);
    }
  }
  acc = ::fastkd::cuda::block_sum(acc);
  if (threadIdx.x == 0) partial[n * gridDim.x + blockIdx.x] = acc;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> image_distance_fwd_cuda(const at::Tensor& a_in, const at::Tensor& b_in,
                                                           int64_t p, int64_t reduction, bool need_grad) {
  TORCH_CHECK(a_in.sizes() == b_in.sizes(), "image_distance: a and b must have the same shape");
  TORCH_CHECK(a_in.dim() >= 1 && a_in.size(0) > 0 && a_in.numel() > 0, "image_distance: empty input");
  TORCH_CHECK(a_in.scalar_type() == b_in.scalar_type(), "image_distance: a and b dtypes differ");
  TORCH_CHECK(p == 1 || p == 2, "image_distance: p must be 1 or 2, got ", p);
  TORCH_CHECK(reduction >= 0 && reduction <= 2, "image_distance: bad reduction code ", reduction);
  TORCH_CHECK(on_device(a_in) && on_device(b_in), "image_distance (cuda backend): CUDA tensors expected");
  const c10::cuda::CUDAGuard guard(a_in.device());
  const at::Tensor a = a_in.contiguous(), b = b_in.contiguous();
  const int64_t N = a.size(0), D = a.numel() / N;
  TORCH_CHECK(N <= 65535, "image_distance (cuda backend): at most 65535 samples per call");
  const double per = p == 1 ? 1.0 / static_cast<double>(D) : 1.0;
  const double red = reduction == kMean ? 1.0 / static_cast<double>(N) : 1.0;
  at::Tensor grad = need_grad ? at::empty_like(a, at::MemoryFormat::Contiguous) : at::empty({0}, a.options());
  const int threads = 256;
  int sms = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, a.device().index()));
  int64_t bx = (D + threads * 4 - 1) / (threads * 4);
  bx = std::max<int64_t>(1, std::min<int64_t>(bx, std::max<int64_t>(1, (sms * 8 + N - 1) / N)));
  const bool is_double = a.scalar_type() == at::kDouble;
  at::Tensor partial = at::empty({N, bx}, a.options().dtype(is_double ? at::kDouble : at::kFloat));
  const dim3 grid(static_cast<unsigned>(bx), static_cast<unsigned>(N));
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream(a.device().index()).stream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.scalar_type(), "image_distance_fwd_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    auto launch = [&](auto p_c, auto grad_c) {
      constexpr int P = decltype(p_c)::value;
      constexpr bool G = decltype(grad_c)::value;
      FKD_LAUNCH(grid, threads, 0, stream, image_distance_kernel<scalar_t, acc_t, P, G>)(
          a.const_data_ptr<scalar_t>(), b.const_data_ptr<scalar_t>(),
          G ? grad.mutable_data_ptr<scalar_t>() : nullptr, partial.mutable_data_ptr<acc_t>(), D,
          static_cast<acc_t>(per * red));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    };
    using T = std::true_type;
    using F = std::false_type;
    using P1 = std::integral_constant<int, 1>;
    using P2 = std::integral_constant<int, 2>;
    if (p == 1) { need_grad ? launch(P1{}, T{}) : launch(P1{}, F{}); }
    else        { need_grad ? launch(P2{}, T{}) : launch(P2{}, F{}); }
  });
  at::Tensor per_sample = partial.sum(1).mul_(per);
  at::Tensor loss = reduction == kNone ? per_sample : per_sample.sum().mul_(red);
  return {loss.to(a.scalar_type()), grad};
}

}  // namespace fastkd

TORCH_LIBRARY_IMPL(fastkd, CUDA, m) {
  m.impl("image_distance_fwd", &fastkd::image_distance_fwd_cuda);
}
