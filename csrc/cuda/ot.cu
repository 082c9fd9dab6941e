// Empirical optimal transport on CUDA: the distance-matrix epilogue (norms fused, cancelled
// entries recomputed, clamped) and sliced projections whose random directions are generated
// inside the kernels (no D x L matrix is ever stored).
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>

#include "common/device.cuh"

#include "fastkd.h"
#include "ot.h"

namespace fastkd {
namespace {

// One warp per entry (i, j): d = na_i + nb_j - 2 G_ij in double; where it has cancelled
// (d <= tau (na_i + nb_j)) the warp recomputes sum_k (a_ik - b_jk)^2 from the rows.
template <typename ct>
__global__ void __launch_bounds__(256) sqdist_epilogue(const ct* __restrict__ G, const double* __restrict__ na,
                                                       const double* __restrict__ nb, const ct* __restrict__ a,
                                                       const ct* __restrict__ b, ct* __restrict__ out,
                                                       int64_t N, int64_t M, int64_t D, double tau) {
  const int64_t e = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) >> 5;
  const int lane = threadIdx.x & 31;
  if (e >= N * M) return;  // whole warps exit together
  const int64_t i = e / M, j = e % M;
  const double s = na[i] + nb[j];
  double d = s - 2.0 * static_cast<double>(G[e]);
  if (d <= tau * s) {
    double acc = 0.0;
    const ct* x = a + i * D;
    const ct* y = b + j * D;
    for (int64_t k = lane; k < D; k += 32) {
      const double t = static_cast<double>(x[k]) - static_cast<double>(y[k]);
      acc += t * t;
    }
    for (int o = 16; o > 0; o >>= 1) acc += __shfl_down_sync(0xffffffffu, acc, o);
    d = acc;
  }
  if (lane == 0) out[e] = static_cast<ct>(d < 0.0 ? 0.0 : d);  // NaN stays NaN
}

constexpr int kR = 8;   // rows per block
constexpr int kLB = 8;  // directions per block

// proj[n, l] = sum_d x[n, d] z(l, d) for a tile of kR rows and kLB directions; sq[l] = sum_d z^2.
template <typename ct>
__global__ void __launch_bounds__(256) project_kernel(const ct* __restrict__ x, ct* __restrict__ proj,
                                                      float* __restrict__ sq, int64_t N, int64_t D,
                                                      int64_t L, uint32_t seed) {
  const int64_t r0 = static_cast<int64_t>(blockIdx.x) * kR;
  const int64_t l0 = static_cast<int64_t>(blockIdx.y) * kLB;
  uint32_t key[kLB];
#pragma unroll
  for (int q = 0; q < kLB; ++q) key[q] = ot_dir_key(seed, static_cast<uint32_t>(l0 + q));
  ct acc[kR][kLB];
  float s2[kLB];
#pragma unroll
  for (int q = 0; q < kLB; ++q) {
    s2[q] = 0.f;
#pragma unroll
    for (int r = 0; r < kR; ++r) acc[r][q] = ct(0);
  }
  for (int64_t d = threadIdx.x; d < D; d += blockDim.x) {
    ct xv[kR];
#pragma unroll
    for (int r = 0; r < kR; ++r) xv[r] = r0 + r < N ? __ldg(x + (r0 + r) * D + d) : ct(0);
#pragma unroll
    for (int q = 0; q < kLB; ++q) {
      const float z = ot_normal(key[q], static_cast<uint32_t>(d));
      s2[q] += z * z;
#pragma unroll
      for (int r = 0; r < kR; ++r) acc[r][q] += xv[r] * static_cast<ct>(z);
    }
  }
  __shared__ ct red[kR * kLB][8];
  __shared__ float red2[kLB][8];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
  for (int q = 0; q < kLB; ++q) {
    float v2 = s2[q];
    for (int o = 16; o > 0; o >>= 1) v2 += __shfl_down_sync(0xffffffffu, v2, o);
    if (lane == 0) red2[q][warp] = v2;
#pragma unroll
    for (int r = 0; r < kR; ++r) {
      ct v = acc[r][q];
      for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(0xffffffffu, v, o);
      if (lane == 0) red[r * kLB + q][warp] = v;
    }
  }
  __syncthreads();
  const int nw = blockDim.x >> 5;
  if (threadIdx.x < kR * kLB) {
    const int r = threadIdx.x / kLB, q = threadIdx.x % kLB;
    ct v = ct(0);
    for (int w = 0; w < nw; ++w) v += red[threadIdx.x][w];
    if (r0 + r < N && l0 + q < L) proj[(r0 + r) * L + l0 + q] = v;
  }
  if (blockIdx.x == 0 && threadIdx.x < kLB && l0 + threadIdx.x < L) {
    float v = 0.f;
    for (int w = 0; w < nw; ++w) v += red2[threadIdx.x][w];
    sq[l0 + threadIdx.x] = v;
  }
}

// out[n, d] = sum_l g[n, l] inv[l] z(l, d) for kR rows per thread row-tile.
template <typename ct>
__global__ void __launch_bounds__(256) backproject_kernel(const ct* __restrict__ g, const ct* __restrict__ inv,
                                                          ct* __restrict__ out, int64_t N, int64_t D,
                                                          int64_t L, uint32_t seed) {
  const int64_t d = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t r0 = static_cast<int64_t>(blockIdx.y) * kR;
  if (d >= D) return;
  ct acc[kR];
#pragma unroll
  for (int r = 0; r < kR; ++r) acc[r] = ct(0);
  for (int64_t l = 0; l < L; ++l) {
    const ct z = static_cast<ct>(ot_normal(ot_dir_key(seed, static_cast<uint32_t>(l)),
                                           static_cast<uint32_t>(d))) * __ldg(inv + l);
#pragma unroll
    for (int r = 0; r < kR; ++r) acc[r] += (r0 + r < N ? __ldg(g + (r0 + r) * L + l) : ct(0)) * z;
  }
#pragma unroll
  for (int r = 0; r < kR; ++r)
    if (r0 + r < N) out[(r0 + r) * D + d] = acc[r];
}

at::ScalarType compute_type(const at::Tensor& t) {
  return t.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

}  // namespace

at::Tensor pairwise_sqdist_fwd_cuda(const at::Tensor& a_in, const at::Tensor& b_in) {
  TORCH_CHECK(a_in.dim() == 2 && b_in.dim() == 2 && a_in.size(1) == b_in.size(1),
              "pairwise_sqdist: a (N, D) and b (M, D) expected");
  TORCH_CHECK(on_device(a_in) && on_device(b_in), "pairwise_sqdist (cuda backend): CUDA tensors expected");
  const c10::cuda::CUDAGuard guard(a_in.device());
  const auto ct = compute_type(a_in);
  const at::Tensor a = a_in.to(ct).contiguous(), b = b_in.to(ct).contiguous();
  const int64_t N = a.size(0), M = b.size(0), D = a.size(1);
  const at::Tensor mu = (a.sum(0) + b.sum(0)) / static_cast<double>(std::max<int64_t>(1, N + M));
  const at::Tensor ac = a - mu, bc = b - mu;
  const at::Tensor na = at::linalg_vector_norm(ac, 2, {1}, false, at::kDouble).square();
  const at::Tensor nb = at::linalg_vector_norm(bc, 2, {1}, false, at::kDouble).square();
  // full fp32 whatever torch.backends.cuda.matmul.allow_tf32 says: TF32's 10-bit mantissa
  // would move G by ~1e-3 relative, which the cancellation test below then amplifies
  const at::NoTF32Guard full_fp32;
  const at::Tensor G = at::mm(ac, bc.t()).contiguous();
  at::Tensor out = at::empty({N, M}, a.options());
  const int64_t warps = N * M;
  if (warps > 0) {
    const int threads = 256;
    const int64_t blocks = (warps * 32 + threads - 1) / threads;
    cudaStream_t stream = c10::cuda::getCurrentCUDAStream(a.device().index()).stream();
    AT_DISPATCH_FLOATING_TYPES(ct, "pairwise_sqdist_fwd_cuda", [&] {
      FKD_LAUNCH(static_cast<unsigned>(blocks), threads, 0, stream, sqdist_epilogue<scalar_t>)(
          G.const_data_ptr<scalar_t>(), na.const_data_ptr<double>(), nb.const_data_ptr<double>(),
          a.const_data_ptr<scalar_t>(), b.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>(),
          N, M, D, ct == at::kDouble ? 1e-7 : 1.0 / 64.0);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  return out.to(a_in.scalar_type());
}

std::tuple<at::Tensor, at::Tensor> sliced_project_cuda(const at::Tensor& x_in, int64_t L, int64_t seed) {
  TORCH_CHECK(x_in.dim() == 2 && L > 0, "sliced_project: x (N, D) and n_projections > 0 expected");
  TORCH_CHECK(on_device(x_in), "sliced_project (cuda backend): CUDA tensor expected");
  const c10::cuda::CUDAGuard guard(x_in.device());
  const auto ct = compute_type(x_in);
  const at::Tensor x = x_in.to(ct).contiguous();
  const int64_t N = x.size(0), D = x.size(1);
  TORCH_CHECK((L + kLB - 1) / kLB <= 65535, "sliced_project (cuda backend): too many projections");
  at::Tensor proj = at::empty({N, L}, x.options());
  at::Tensor sq = at::empty({L}, x.options().dtype(at::kFloat));
  const uint32_t s32 = static_cast<uint32_t>(static_cast<uint64_t>(seed) & 0xffffffffULL);
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream(x.device().index()).stream();
  // at least one row tile, also for N = 0: the first tile of rows computes the norms
  const dim3 grid(static_cast<unsigned>(std::max<int64_t>(1, (N + kR - 1) / kR)),
                  static_cast<unsigned>((L + kLB - 1) / kLB));
  AT_DISPATCH_FLOATING_TYPES(ct, "sliced_project_cuda", [&] {
    FKD_LAUNCH(grid, 256, 0, stream, project_kernel<scalar_t>)(
        x.const_data_ptr<scalar_t>(), proj.mutable_data_ptr<scalar_t>(), sq.mutable_data_ptr<float>(), N, D, L, s32);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  at::Tensor inv = sq.to(ct).rsqrt();
  proj.mul_(inv.unsqueeze(0));
  return {proj.to(x_in.scalar_type()), inv};
}

at::Tensor sliced_backproject_cuda(const at::Tensor& g_in, const at::Tensor& inv_norm, int64_t D, int64_t seed) {
  TORCH_CHECK(g_in.dim() == 2 && inv_norm.dim() == 1 && inv_norm.size(0) == g_in.size(1),
              "sliced_backproject: g (N, L) and inv_norm (L,) expected");
  TORCH_CHECK(on_device(g_in), "sliced_backproject (cuda backend): CUDA tensor expected");
  const c10::cuda::CUDAGuard guard(g_in.device());
  const auto ct = compute_type(g_in);
  const at::Tensor g = g_in.to(ct).contiguous();
  const at::Tensor inv = inv_norm.to(ct).contiguous();
  const int64_t N = g.size(0), L = g.size(1);
  TORCH_CHECK((N + kR - 1) / kR <= 65535, "sliced_backproject (cuda backend): too many rows");
  at::Tensor out = at::empty({N, D}, g.options());
  if (N == 0 || D == 0) return out.to(g_in.scalar_type());  // nothing to launch (a 0-block grid is an error)
  const uint32_t s32 = static_cast<uint32_t>(static_cast<uint64_t>(seed) & 0xffffffffULL);
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream(g.device().index()).stream();
  const dim3 grid(static_cast<unsigned>((D + 255) / 256), static_cast<unsigned>((N + kR - 1) / kR));
  AT_DISPATCH_FLOATING_TYPES(ct, "sliced_backproject_cuda", [&] {
    FKD_LAUNCH(grid, 256, 0, stream, backproject_kernel<scalar_t>)(
        g.const_data_ptr<scalar_t>(), inv.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>(), N, D, L, s32);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out.to(g_in.scalar_type());
}

}  // namespace fastkd

TORCH_LIBRARY_IMPL(fastkd, CUDA, m) {
  m.impl("pairwise_sqdist_fwd", &fastkd::pairwise_sqdist_fwd_cuda);
  m.impl("pairwise_sqdist_bwd", &fastkd::pairwise_sqdist_bwd);
  m.impl("sliced_project", &fastkd::sliced_project_cuda);
  m.impl("sliced_backproject", &fastkd::sliced_backproject_cuda);
}
