// Total variation on CUDA: forward and gradient in one pass over x.
//
// grid = (blocks per sample, N). Each thread walks a grid-stride loop over the sample's
// C*H*W elements; for each element it computes the loss terms whose origin it is and
// its own gradient (a gather over its neighbours: no atomics, deterministic). Loss
// partials are reduced in the block and written per (sample, block); the final sum is
// a tiny second reduction on the host side, so results are bit-for-bit reproducible.
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>

#include "common/device.cuh"

#include "fastkd.h"
#include "cuda/reduce.cuh"

namespace fastkd {
namespace {

template <typename T, int P>
__device__ __forceinline__ T tv_f(T d) {
  if constexpr (P == 1) return fabs(d); else return d * d;
}
template <typename T, int P>
__device__ __forceinline__ T tv_g(T d) {
  if constexpr (P == 1) return static_cast<T>(d > T(0)) - static_cast<T>(d < T(0));
  else return T(2) * d;
}

template <typename scalar_t, typename acc_t, int P, bool DIAG, bool GRAD>
__global__ void __launch_bounds__(256) tv_fwd_kernel(const scalar_t* __restrict__ x,
                                                     scalar_t* __restrict__ grad,
                                                     acc_t* __restrict__ partial, int64_t per_sample,
                                                     int H, int W, acc_t scale) {
  const int64_t n = blockIdx.y;
  const scalar_t* __restrict__ xs = x + n * per_sample;
  scalar_t* __restrict__ gs = GRAD ? grad + n * per_sample : nullptr;
  acc_t acc = acc_t(0);
  const int64_t HW = static_cast<int64_t>(H) * W;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < per_sample;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t hw = i % HW;
    const int h = static_cast<int>(hw / W), w = static_cast<int>(hw % W);
    const bool u = h > 0, d = h + 1 < H, l = w > 0, r = w + 1 < W;
    const acc_t c = static_cast<acc_t>(__ldg(xs + i));
    acc_t g = acc_t(0);
    if (r) {
      const acc_t v = static_cast<acc_t>(__ldg(xs + i + 1)) - c;
      acc += tv_f<acc_t, P>(v);
      if (GRAD) g -= tv_g<acc_t, P>(v);
    }
    if (d) {
      const acc_t v = static_cast<acc_t>(__ldg(xs + i + W)) - c;
      acc += tv_f<acc_t, P>(v);
      if (GRAD) g -= tv_g<acc_t, P>(v);
    }
    if (DIAG && d && r) {
      const acc_t v = static_cast<acc_t>(__ldg(xs + i + W + 1)) - c;
      acc += tv_f<acc_t, P>(v);
      if (GRAD) g -= tv_g<acc_t, P>(v);
    }
    if (DIAG && d && l) {
      const acc_t v = static_cast<acc_t>(__ldg(xs + i + W - 1)) - c;
      acc += tv_f<acc_t, P>(v);
      if (GRAD) g -= tv_g<acc_t, P>(v);
    }
    if (GRAD) {
      if (l) g += tv_g<acc_t, P>(c - static_cast<acc_t>(__ldg(xs + i - 1)));
      if (u) g += tv_g<acc_t, P>(c - static_cast<acc_t>(__ldg(xs + i - W)));
      if (DIAG && u && l) g += tv_g<acc_t, P>(c - static_cast<acc_t>(__ldg(xs + i - W - 1)));
      if (DIAG && u && r) g += tv_g<acc_t, P>(c - static_cast<acc_t>(__ldg(xs + i - W + 1)));
      gs[i] = static_cast<scalar_t>(g * scale);
    }
  }
  acc = ::fastkd::cuda::block_sum(acc);
  if (threadIdx.x == 0) partial[n * gridDim.x + blockIdx.x] = acc;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> tv_loss_fwd_cuda(const at::Tensor& x_in, int64_t p, bool diagonal,
                                                    int64_t reduction, bool need_grad) {
  tv_check(x_in, p, reduction);
  TORCH_CHECK(on_device(x_in), "tv_loss (cuda backend): x must be a CUDA tensor");
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = x_in.contiguous();
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  const int64_t per_sample = C * H * W;
  const int64_t terms = N * C * tv_terms_per_plane(H, W, diagonal);
  const double scale = (reduction == kMean && terms > 0) ? 1.0 / static_cast<double>(terms) : 1.0;
  at::Tensor grad = need_grad ? at::empty_like(x, at::MemoryFormat::Contiguous) : at::empty({0}, x.options());
  const int threads = 256;
  int sms = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, x.device().index()));
  // Enough blocks to fill the GPU a few times over, each thread handling a few elements.
  int64_t bx = (per_sample + threads * 4 - 1) / (threads * 4);
  bx = std::max<int64_t>(1, std::min<int64_t>(bx, std::max<int64_t>(1, (sms * 8 + N - 1) / N)));
  TORCH_CHECK(N <= 65535, "tv_loss (cuda backend): at most 65535 samples per call");
  const bool is_double = x.scalar_type() == at::kDouble;
  at::Tensor partial = at::empty({N, bx}, x.options().dtype(is_double ? at::kDouble : at::kFloat));
  if (N == 0 || per_sample == 0) partial.zero_();
  const dim3 grid(static_cast<unsigned>(bx), static_cast<unsigned>(N));
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream(x.device().index()).stream();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "tv_loss_fwd_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    auto launch = [&](auto p_c, auto diag_c, auto grad_c) {
      constexpr int P = decltype(p_c)::value;
      constexpr bool D = decltype(diag_c)::value, G = decltype(grad_c)::value;
      if (N == 0 || per_sample == 0) return;
      FKD_LAUNCH(grid, threads, 0, stream, tv_fwd_kernel<scalar_t, acc_t, P, D, G>)(
          x.const_data_ptr<scalar_t>(), G ? grad.mutable_data_ptr<scalar_t>() : nullptr,
          partial.mutable_data_ptr<acc_t>(), per_sample, static_cast<int>(H), static_cast<int>(W),
          static_cast<acc_t>(scale));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    };
    using T = std::true_type;
    using F = std::false_type;
    using P1 = std::integral_constant<int, 1>;
    using P2 = std::integral_constant<int, 2>;
    if (p == 1) {
      if (diagonal) { need_grad ? launch(P1{}, T{}, T{}) : launch(P1{}, T{}, F{}); }
      else          { need_grad ? launch(P1{}, F{}, T{}) : launch(P1{}, F{}, F{}); }
    } else {
      if (diagonal) { need_grad ? launch(P2{}, T{}, T{}) : launch(P2{}, T{}, F{}); }
      else          { need_grad ? launch(P2{}, F{}, T{}) : launch(P2{}, F{}, F{}); }
    }
  });
  at::Tensor loss = reduction == kNone ? partial.sum(1) : partial.sum().mul_(scale);
  return {loss.to(x.scalar_type()), grad};
}

}  // namespace fastkd

TORCH_LIBRARY_IMPL(fastkd, CUDA, m) {
  m.impl("tv_loss_fwd", &fastkd::tv_loss_fwd_cuda);
}
