// BatchNorm-statistics loss on CUDA.
//
// Forward, two launches: (1) grid (chunks, C): each block reduces a chunk of one channel's
// N*S elements to shifted sums of (x - K_c) and (x - K_c)^2, K_c = x[0, c, 0]; (2) one
// block folds the partials into mean, variance, the two norms and the loss (deterministic,
// no atomics). Backward, one launch: grad = g * (a_c + b_c * (x - mu_c)) with the
// coefficients formed per element from the saved statistics and the device-side incoming
// gradient, so nothing is read back to the host.
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>

#include "common/device.cuh"

#include "bn_stats.h"

namespace fastkd {
namespace {

template <typename T>
__device__ __forceinline__ void block_sum2(T& a, T& b) {
  __shared__ T sa[32], sb[32];
  for (int o = 16; o > 0; o >>= 1) {
    a += __shfl_down_sync(0xffffffffu, a, o);
    b += __shfl_down_sync(0xffffffffu, b, o);
  }
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (lane == 0) { sa[warp] = a; sb[warp] = b; }
  __syncthreads();
  const int nw = (blockDim.x + 31) >> 5;
  a = threadIdx.x < nw ? sa[threadIdx.x] : T(0);
  b = threadIdx.x < nw ? sb[threadIdx.x] : T(0);
  if (warp == 0)
    for (int o = 16; o > 0; o >>= 1) {
      a += __shfl_down_sync(0xffffffffu, a, o);
      b += __shfl_down_sync(0xffffffffu, b, o);
    }
  __syncthreads();
}

template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(256) bn_partial_kernel(const scalar_t* __restrict__ x,
                                                         acc_t* __restrict__ part, int64_t C, int64_t S,
                                                         int64_t M, int64_t per_chunk) {
  const int64_t c = blockIdx.y, k = blockIdx.x;
  const acc_t shift = static_cast<acc_t>(x[c * S]);
  const int64_t begin = k * per_chunk;
  const int64_t end = begin + per_chunk < M ? begin + per_chunk : M;
  acc_t s1 = acc_t(0), s2 = acc_t(0);
  for (int64_t j = begin + threadIdx.x; j < end; j += blockDim.x) {
    const int64_t n = j / S, s = j - n * S;
    const acc_t d = static_cast<acc_t>(__ldg(x + (n * C + c) * S + s)) - shift;
    s1 += d;
    s2 += d * d;
  }
  block_sum2(s1, s2);
  if (threadIdx.x == 0) {
    part[(c * gridDim.x + k) * 2] = s1;
    part[(c * gridDim.x + k) * 2 + 1] = s2;
  }
}

template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(256) bn_finalize_kernel(const scalar_t* __restrict__ x,
                                                          const acc_t* __restrict__ part, int64_t nchunk,
                                                          const acc_t* __restrict__ rm, const acc_t* __restrict__ rv,
                                                          acc_t* __restrict__ mean, acc_t* __restrict__ var,
                                                          acc_t* __restrict__ norms, acc_t* __restrict__ loss,
                                                          int64_t C, int64_t S, int64_t M) {
  acc_t dm = acc_t(0), dv = acc_t(0);
  const acc_t inv_m = acc_t(1) / static_cast<acc_t>(M);
  for (int64_t c = threadIdx.x; c < C; c += blockDim.x) {
    acc_t s1 = acc_t(0), s2 = acc_t(0);
    for (int64_t k = 0; k < nchunk; ++k) {
      s1 += part[(c * nchunk + k) * 2];
      s2 += part[(c * nchunk + k) * 2 + 1];
    }
    const acc_t d1 = s1 * inv_m;
    const acc_t mu = static_cast<acc_t>(x[c * S]) + d1;
    acc_t v = s2 * inv_m - d1 * d1;
    v = v > acc_t(0) ? v : acc_t(0);
    mean[c] = mu;
    var[c] = v;
    const acc_t a = mu - rm[c], b = v - rv[c];
    dm += a * a;
    dv += b * b;
  }
  block_sum2(dm, dv);
  if (threadIdx.x == 0) {
    const acc_t n0 = sqrt(dm), n1 = sqrt(dv);
    norms[0] = n0;
    norms[1] = n1;
    *loss = n0 + n1;
  }
}

template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(256) bn_bwd_kernel(const scalar_t* __restrict__ x, scalar_t* __restrict__ gx,
                                                     const acc_t* __restrict__ grad, const acc_t* __restrict__ mean,
                                                     const acc_t* __restrict__ var, const acc_t* __restrict__ rm,
                                                     const acc_t* __restrict__ rv, const acc_t* __restrict__ norms,
                                                     int64_t C, int64_t S, int64_t total, acc_t inv_m) {
  const acc_t g = *grad, n0 = norms[0], n1 = norms[1];
  const acc_t ka = n0 > acc_t(0) ? g * inv_m / n0 : acc_t(0);
  const acc_t kb = n1 > acc_t(0) ? acc_t(2) * g * inv_m / n1 : acc_t(0);
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t c = (i / S) % C;
    const acc_t mu = __ldg(mean + c);
    const acc_t a = ka * (mu - __ldg(rm + c));
    const acc_t b = kb * (__ldg(var + c) - __ldg(rv + c));
    gx[i] = static_cast<scalar_t>(a + b * (static_cast<acc_t>(__ldg(x + i)) - mu));
  }
}

int sm_count(const at::Tensor& x) {
  int sms = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, x.device().index()));
  return sms;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> bn_stats_fwd_cuda(
    const at::Tensor& x_in, const at::Tensor& rm_in, const at::Tensor& rv_in) {
  bn_stats_check(x_in, rm_in, rv_in);
  TORCH_CHECK(on_device(x_in), "bn_stats_loss (cuda backend): x must be a CUDA tensor");
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = x_in.contiguous();
  const at::Tensor rm = rm_in.contiguous(), rv = rv_in.contiguous();
  const int64_t N = x.size(0), C = x.size(1), S = bn_plane_size(x), M = N * S;
  const auto acc = bn_acc_type(x.scalar_type());
  TORCH_CHECK(C <= 65535, "bn_stats_loss (cuda backend): at most 65535 channels");
  // Enough blocks to fill the GPU a few times over, each covering at least 4096 elements.
  const int64_t want = std::max<int64_t>(1, (static_cast<int64_t>(sm_count(x)) * 8 + C - 1) / C);
  const int64_t nchunk = std::max<int64_t>(1, std::min<int64_t>(want, (M + 4095) / 4096));
  const int64_t per_chunk = (M + nchunk - 1) / nchunk;
  at::Tensor part = at::empty({C, nchunk, 2}, x.options().dtype(acc));
  at::Tensor mean = at::empty({C}, x.options().dtype(acc));
  at::Tensor var = at::empty({C}, x.options().dtype(acc));
  at::Tensor norms = at::empty({2}, x.options().dtype(acc));
  at::Tensor loss = at::empty({}, x.options().dtype(acc));
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream(x.device().index()).stream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "bn_stats_fwd_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    FKD_LAUNCH(dim3(static_cast<unsigned>(nchunk), static_cast<unsigned>(C)), 256, 0, stream,
               bn_partial_kernel<scalar_t, acc_t>)(x.const_data_ptr<scalar_t>(), part.mutable_data_ptr<acc_t>(), C, S,
                                                   M, per_chunk);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    FKD_LAUNCH(1, 256, 0, stream, bn_finalize_kernel<scalar_t, acc_t>)(
        x.const_data_ptr<scalar_t>(), part.const_data_ptr<acc_t>(), nchunk, rm.const_data_ptr<acc_t>(),
        rv.const_data_ptr<acc_t>(), mean.mutable_data_ptr<acc_t>(), var.mutable_data_ptr<acc_t>(),
        norms.mutable_data_ptr<acc_t>(), loss.mutable_data_ptr<acc_t>(), C, S, M);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {loss.to(x.scalar_type()), mean, var, norms};
}

at::Tensor bn_stats_bwd_cuda(const at::Tensor& grad, const at::Tensor& x_in, const at::Tensor& mean,
                             const at::Tensor& var, const at::Tensor& rm_in, const at::Tensor& rv_in,
                             const at::Tensor& norms) {
  bn_stats_check(x_in, rm_in, rv_in);
  TORCH_CHECK(on_device(x_in), "bn_stats_loss (cuda backend): x must be a CUDA tensor");
  TORCH_CHECK(grad.numel() == 1, "bn_stats_loss: the incoming gradient must be a scalar");
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = x_in.contiguous();
  const auto acc = bn_acc_type(x.scalar_type());
  const at::Tensor g = grad.to(acc).contiguous();
  const at::Tensor m = mean.to(acc).contiguous(), v = var.to(acc).contiguous();
  const at::Tensor rm = rm_in.contiguous(), rv = rv_in.contiguous(), nr = norms.to(acc).contiguous();
  const int64_t N = x.size(0), C = x.size(1), S = bn_plane_size(x), total = x.numel();
  at::Tensor gx = at::empty_like(x, at::MemoryFormat::Contiguous);
  const int64_t blocks = std::max<int64_t>(1, std::min<int64_t>((total + 1023) / 1024,
                                                                static_cast<int64_t>(sm_count(x)) * 16));
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream(x.device().index()).stream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "bn_stats_bwd_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    FKD_LAUNCH(static_cast<unsigned>(blocks), 256, 0, stream, bn_bwd_kernel<scalar_t, acc_t>)(
        x.const_data_ptr<scalar_t>(), gx.mutable_data_ptr<scalar_t>(), g.const_data_ptr<acc_t>(),
        m.const_data_ptr<acc_t>(), v.const_data_ptr<acc_t>(), rm.const_data_ptr<acc_t>(),
        rv.const_data_ptr<acc_t>(), nr.const_data_ptr<acc_t>(), C, S, total,
        static_cast<acc_t>(1.0 / (static_cast<double>(N) * static_cast<double>(S))));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return gx;
}

}  // namespace fastkd

TORCH_LIBRARY_IMPL(fastkd, CUDA, m) {
  m.impl("bn_stats_fwd", &fastkd::bn_stats_fwd_cuda);
  m.impl("bn_stats_bwd", &fastkd::bn_stats_bwd_cuda);
}
