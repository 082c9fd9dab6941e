// Cross-class contrastive loss on CUDA: the O(N*K) closed form (see the CPU file).
//
// Segments (group, class) are made dense with at::_unique2 (one device sync, for the
// number of segments and of pairs). Four kernels follow: group sums, centred segment
// sums, group sums of those (float64 atomics), and a row pass that writes the gradient
// and per-block loss partials.
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>

#include "common/device.cuh"

#include "cake_ops.h"
#include "cuda/reduce.cuh"

namespace fastkd {
namespace {

template <typename scalar_t>
__global__ void scatter_rows_kernel(const scalar_t* __restrict__ src, const int64_t* __restrict__ idx,
                                    double* __restrict__ dst, int64_t R, int64_t K) {
  const int64_t total = R * K;
  for (int64_t e = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; e < total;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t r = e / K, k = e % K;
    atomicAdd(dst + idx[r] * K + k, static_cast<double>(src[e]));
  }
}

template <typename scalar_t>
__global__ void centred_sums_kernel(const scalar_t* __restrict__ p, const int64_t* __restrict__ gid,
                                    const int64_t* __restrict__ sid, const double* __restrict__ gsum,
                                    const int64_t* __restrict__ ng, double* __restrict__ T, int64_t N,
                                    int64_t K) {
  const int64_t total = N * K;
  for (int64_t e = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; e < total;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t i = e / K, k = e % K, g = gid[i];
    const double q = static_cast<double>(p[e]) - gsum[g * K + k] / static_cast<double>(ng[g]);
    atomicAdd(T + sid[i] * K + k, q);
  }
}

// One thread per row (rows are short: K is the number of classes).
template <typename scalar_t, bool GRAD>
__global__ void __launch_bounds__(256) grad_rows_kernel(
    const scalar_t* __restrict__ p, const int64_t* __restrict__ gid, const int64_t* __restrict__ sid,
    const double* __restrict__ gsum, const int64_t* __restrict__ ng, const int64_t* __restrict__ ns,
    const double* __restrict__ T, const double* __restrict__ U, scalar_t* __restrict__ grad,
    double* __restrict__ part, int64_t N, int64_t K, double gscale) {
  double acc = 0.0;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < N;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t g = gid[i], s = sid[i];
    const double cnt = static_cast<double>(ng[g]);
    const double w = static_cast<double>(ng[g] - ns[s]);
    double a = 0.0;
    for (int64_t k = 0; k < K; ++k) {
      const double q = static_cast<double>(p[i * K + k]) - gsum[g * K + k] / cnt;
      a += q * q;
      if (GRAD) grad[i * K + k] = static_cast<scalar_t>(gscale * (w * q - (U[g * K + k] - T[s * K + k])));
    }
    acc += w * a;
  }
  acc = ::fastkd::cuda::block_sum<double>(acc);
  if (threadIdx.x == 0) part[blockIdx.x] = acc;
}

int blocks_for(int64_t work, int threads, int device) {
  int sms = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  const int64_t b = (work + threads - 1) / threads;
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(b, static_cast<int64_t>(sms) * 8)));
}

at::Tensor dense_ids(const at::Tensor& t) {
  auto res = at::_unique2(t, /*sorted=*/true, /*return_inverse=*/true, /*return_counts=*/false);
  return std::get<1>(res).reshape({-1});
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> cross_class_contrastive_fwd_cuda(
    const at::Tensor& outputs, const at::Tensor& labels, const c10::optional<at::Tensor>& groups,
    int64_t reduction, bool need_grad) {
  TORCH_CHECK(outputs.dim() == 2, "cross_class_contrastive: outputs must be 2-D (N, K)");
  TORCH_CHECK(on_device(outputs), "cross_class_contrastive (cuda backend): outputs must be a CUDA tensor");
  TORCH_CHECK(labels.scalar_type() == at::kLong && labels.dim() == 1 && labels.size(0) == outputs.size(0),
              "cross_class_contrastive: labels must be int64 of shape (N,)");
  TORCH_CHECK(reduction == kMean || reduction == kSum, "cross_class_contrastive: reduction must be mean or sum");
  const c10::cuda::CUDAGuard guard(outputs.device());
  const at::Tensor p = outputs.contiguous();
  const int64_t N = p.size(0), K = p.size(1);
  at::Tensor grad = need_grad ? at::zeros_like(p, at::MemoryFormat::Contiguous) : at::empty({0}, p.options());
  if (N == 0 || K == 0) return {at::zeros({}, p.options()), grad};
  const auto i64 = labels.options().dtype(at::kLong);
  at::Tensor gid = groups.has_value() ? dense_ids(groups->contiguous()) : at::zeros({N}, i64);
  at::Tensor lid = dense_ids(labels.contiguous());
  const int64_t G = gid.max().item<int64_t>() + 1;
  const int64_t L = lid.max().item<int64_t>() + 1;
  at::Tensor sid = dense_ids(gid * L + lid);
  const int64_t S = sid.max().item<int64_t>() + 1;
  at::Tensor sg = at::zeros({S}, i64).scatter_(0, sid, gid);
  at::Tensor ng = at::bincount(gid, {}, G);
  at::Tensor ns = at::bincount(sid, {}, S);
  const double pairs = static_cast<double>((ng * ng).sum().item<int64_t>() - (ns * ns).sum().item<int64_t>());
  if (pairs <= 0.0) return {at::zeros({}, p.options()), grad};
  const double scale = reduction == kMean ? 1.0 / pairs : 1.0;
  const auto f64 = p.options().dtype(at::kDouble);
  at::Tensor gsum = at::zeros({G, K}, f64), T = at::zeros({S, K}, f64), U = at::zeros({G, K}, f64);
  const int threads = 256, dev = p.device().index();
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream(dev).stream();
  const int rb = blocks_for(N, threads, dev);
  at::Tensor part = at::zeros({rb}, f64);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, p.scalar_type(), "ccc_fwd_cuda", [&] {
    const scalar_t* pp = p.const_data_ptr<scalar_t>();
    FKD_LAUNCH(blocks_for(N * K, threads, dev), threads, 0, stream, scatter_rows_kernel<scalar_t>)(
        pp, gid.const_data_ptr<int64_t>(), gsum.mutable_data_ptr<double>(), N, K);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    FKD_LAUNCH(blocks_for(N * K, threads, dev), threads, 0, stream, centred_sums_kernel<scalar_t>)(
        pp, gid.const_data_ptr<int64_t>(), sid.const_data_ptr<int64_t>(), gsum.const_data_ptr<double>(),
        ng.const_data_ptr<int64_t>(), T.mutable_data_ptr<double>(), N, K);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    FKD_LAUNCH(blocks_for(S * K, threads, dev), threads, 0, stream, scatter_rows_kernel<double>)(
        T.const_data_ptr<double>(), sg.const_data_ptr<int64_t>(), U.mutable_data_ptr<double>(), S, K);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    auto launch = [&](auto grad_c) {
      constexpr bool GR = decltype(grad_c)::value;
      FKD_LAUNCH(rb, threads, 0, stream, grad_rows_kernel<scalar_t, GR>)(
          pp, gid.const_data_ptr<int64_t>(), sid.const_data_ptr<int64_t>(), gsum.const_data_ptr<double>(),
          ng.const_data_ptr<int64_t>(), ns.const_data_ptr<int64_t>(), T.const_data_ptr<double>(),
          U.const_data_ptr<double>(), GR ? grad.mutable_data_ptr<scalar_t>() : nullptr,
          part.mutable_data_ptr<double>(), N, K, 4.0 * scale);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    };
    if (need_grad) launch(std::true_type{}); else launch(std::false_type{});
  });
  at::Tensor loss = (part.sum() * 2.0 + T.square().sum() * 2.0 - U.square().sum() * 2.0).clamp_min(0.0) * scale;
  return {loss.to(p.scalar_type()), grad};
}

}  // namespace fastkd

TORCH_LIBRARY_IMPL(fastkd, CUDA, m) {
  m.impl("cross_class_contrastive_fwd", &fastkd::cross_class_contrastive_fwd_cuda);
}
