// Langevin step on CUDA, in place (see csrc/cpu/langevin.cpp for the definition).
//
// Without the TV prior: one thread per Philox block (4 consecutive elements), so each
// generator call feeds four elements; read x, read grad, write x = 12 B/elem (fp32).
// With it: one block per (sample, channel) plane walking tiles of rows. The old values of
// the row above the tile are kept in shared memory, and a barrier separates the tile's
// reads from its writes, so the neighbours seen are always the old ones.
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>

#include "common/device.cuh"

#include "cake_ops.h"

namespace fastkd {
namespace {

__device__ __forceinline__ void box_muller(uint32_t ua, uint32_t ub, float& zc, float& zs) {
  const float b = fkd_u_open1(ub);
  const float r = fkd_bm_radius(fkd_u_open0(ua));
  float s, c;
  sincospif(2.0f * b, &s, &c);
  zc = r * c;
  zs = r * s;
}

template <typename scalar_t, typename acc_t, bool LRT, bool SDT, bool NOISE, bool CLAMP>
__global__ void __launch_bounds__(256) step_kernel(scalar_t* __restrict__ x, const scalar_t* __restrict__ g,
                                                   int64_t numel, int64_t per, const acc_t* __restrict__ lrp,
                                                   acc_t lr, const acc_t* __restrict__ sdp, acc_t sd, acc_t lo,
                                                   acc_t hi, uint32_t k0, uint32_t k1) {
  const int64_t nblk = (numel + 3) / 4;
  for (int64_t j = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; j < nblk;
       j += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    float z[4] = {0.f, 0.f, 0.f, 0.f};
    if (NOISE) {
      const Philox4 u = fkd_philox(static_cast<uint32_t>(j), static_cast<uint32_t>(j >> 32), k0, k1);
      box_muller(u.v[0], u.v[1], z[0], z[1]);
      box_muller(u.v[2], u.v[3], z[2], z[3]);
    }
#pragma unroll
    for (int l = 0; l < 4; ++l) {
      const int64_t e = 4 * j + l;
      if (e < numel) {
        const int64_t n = e / per;
        const acc_t lrv = LRT ? static_cast<acc_t>(lrp[n]) : lr;
        acc_t v = static_cast<acc_t>(x[e]) - lrv * static_cast<acc_t>(g[e]);
        if (NOISE) v += (SDT ? static_cast<acc_t>(sdp[n]) : sd) * static_cast<acc_t>(z[l]);
        if (CLAMP) v = v < lo ? lo : (v > hi ? hi : v);
        x[e] = static_cast<scalar_t>(v);
      }
    }
  }
}

template <typename acc_t, int P>
__device__ __forceinline__ acc_t tvg(acc_t d) {
  if constexpr (P == 1) return static_cast<acc_t>(d > acc_t(0)) - static_cast<acc_t>(d < acc_t(0));
  else return acc_t(2) * d;
}

constexpr int kTVThreads = 256;
constexpr int kTVItems = 8;  // tile = at most 2048 elements

template <typename scalar_t, typename acc_t, bool LRT, bool SDT, bool NOISE, bool CLAMP, int P>
__global__ void __launch_bounds__(kTVThreads) step_tv_kernel(
    scalar_t* __restrict__ x, const scalar_t* __restrict__ g, int64_t C, int H, int W, int R,
    const acc_t* __restrict__ lrp, acc_t lr, const acc_t* __restrict__ sdp, acc_t sd, acc_t lo, acc_t hi,
    acc_t tvs, uint32_t k0, uint32_t k1) {
  FKD_DYNAMIC_SMEM(unsigned char, smem_raw);
  acc_t* prev = reinterpret_cast<acc_t*>(smem_raw);  // old values of the row above the tile
  const int64_t plane = blockIdx.x;
  const int64_t n = plane / C;
  const int64_t base = plane * static_cast<int64_t>(H) * W;
  scalar_t* xs = x + base;
  const scalar_t* gs = g + base;
  const acc_t lrv = LRT ? static_cast<acc_t>(lrp[n]) : lr;
  const acc_t sdv = SDT ? static_cast<acc_t>(sdp[n]) : sd;
  for (int w = threadIdx.x; w < W; w += blockDim.x) prev[w] = acc_t(0);
  __syncthreads();
  for (int h0 = 0; h0 < H; h0 += R) {
    const int nr = min(R, H - h0);
    const int tile = nr * W;
    acc_t nv[kTVItems], old[kTVItems];
#pragma unroll
    for (int it = 0; it < kTVItems; ++it) {
      const int t = threadIdx.x + it * kTVThreads;
      if (t < tile) {
        const int h = h0 + t / W, w = t % W;
        const int64_t o = static_cast<int64_t>(h) * W + w;
        const acc_t c = static_cast<acc_t>(xs[o]);
        acc_t gt = acc_t(0);
        if (w > 0) gt += tvg<acc_t, P>(c - static_cast<acc_t>(xs[o - 1]));
        if (w + 1 < W) gt -= tvg<acc_t, P>(static_cast<acc_t>(xs[o + 1]) - c);
        if (h > 0) gt += tvg<acc_t, P>(c - (h == h0 ? prev[w] : static_cast<acc_t>(xs[o - W])));
        if (h + 1 < H) gt -= tvg<acc_t, P>(static_cast<acc_t>(xs[o + W]) - c);
        acc_t v = c - lrv * (static_cast<acc_t>(gs[o]) + tvs * gt);
        if (NOISE) {
          const int64_t e = base + o;
          const int64_t j = e >> 2;
          const int lane = static_cast<int>(e & 3);
          const Philox4 u = fkd_philox(static_cast<uint32_t>(j), static_cast<uint32_t>(j >> 32), k0, k1);
          float zc, zs;
          box_muller(lane < 2 ? u.v[0] : u.v[2], lane < 2 ? u.v[1] : u.v[3], zc, zs);
          v += sdv * static_cast<acc_t>((lane & 1) ? zs : zc);
        }
        if (CLAMP) v = v < lo ? lo : (v > hi ? hi : v);
        nv[it] = v;
        old[it] = c;
      }
    }
    __syncthreads();  // every read of this tile (and of prev) is done
#pragma unroll
    for (int it = 0; it < kTVItems; ++it) {
      const int t = threadIdx.x + it * kTVThreads;
      if (t < tile) {
        const int h = h0 + t / W, w = t % W;
        if (h == h0 + nr - 1) prev[w] = old[it];
        xs[static_cast<int64_t>(h) * W + w] = static_cast<scalar_t>(nv[it]);
      }
    }
    __syncthreads();
  }
}

}  // namespace

void langevin_step_cuda(at::Tensor& x, const at::Tensor& grad_in, const c10::optional<at::Tensor>& lr_t,
                        double lr, const c10::optional<at::Tensor>& std_t, double noise_std,
                        bool do_clamp, double lo, double hi, double tv_weight, int64_t tv_p,
                        int64_t seed) {
  TORCH_CHECK(on_device(x) && on_device(grad_in), "langevin_step_ (cuda backend): x and grad must be CUDA tensors");
  TORCH_CHECK(x.sizes() == grad_in.sizes(), "langevin_step_: grad must have x's shape");
  TORCH_CHECK(x.scalar_type() == grad_in.scalar_type(), "langevin_step_: grad must have x's dtype");
  TORCH_CHECK(x.is_contiguous(), "langevin_step_ (cuda backend): x must be contiguous");
  TORCH_CHECK(x.dim() >= 1, "langevin_step_: x must have a batch dimension");
  TORCH_CHECK(tv_weight == 0.0 || (x.dim() == 4 && (tv_p == 1 || tv_p == 2)),
              "langevin_step_: the TV prior needs x of shape (N, C, H, W) and tv_p 1 or 2");
  if (x.numel() == 0) return;
  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor grad = grad_in.contiguous();
  const int64_t N = x.size(0), per = x.numel() / N;
  // Per-sample lr / noise_std in the accumulation type (double for float64 x): no rounding.
  const auto acc_type = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor lr_f, sd_f;
  if (lr_t.has_value()) lr_f = lr_t->to(x.device(), acc_type).contiguous();
  if (std_t.has_value()) sd_f = std_t->to(x.device(), acc_type).contiguous();
  const bool noise = std_t.has_value() || noise_std != 0.0;
  const uint32_t k0 = static_cast<uint32_t>(static_cast<uint64_t>(seed));
  const uint32_t k1 = static_cast<uint32_t>(static_cast<uint64_t>(seed) >> 32);
  const int dev = x.device().index();
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream(dev).stream();
  int sms = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev));
  using T = std::true_type;
  using F = std::false_type;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "langevin_step_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    scalar_t* xp = x.mutable_data_ptr<scalar_t>();
    const scalar_t* gp = grad.const_data_ptr<scalar_t>();
    const acc_t alr = static_cast<acc_t>(lr), asd = static_cast<acc_t>(noise_std);
    const acc_t alo = static_cast<acc_t>(lo), ahi = static_cast<acc_t>(hi);
    const acc_t* lrp = lr_t.has_value() ? lr_f.const_data_ptr<acc_t>() : nullptr;
    const acc_t* sdp = std_t.has_value() ? sd_f.const_data_ptr<acc_t>() : nullptr;
    if (tv_weight == 0.0) {
      const int64_t nblk = (x.numel() + 3) / 4;
      const int threads = 256;
      const int blocks = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>((nblk + threads - 1) / threads,
                                                                                  static_cast<int64_t>(sms) * 16)));
      auto launch = [&](auto lrt, auto sdt, auto nz, auto cl) {
        FKD_LAUNCH(blocks, threads, 0, stream,
                   step_kernel<scalar_t, acc_t, decltype(lrt)::value, decltype(sdt)::value, decltype(nz)::value,
                               decltype(cl)::value>)(xp, gp, x.numel(), per, lrp, alr, sdp, asd, alo, ahi, k0, k1);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      };
      auto with_clamp = [&](auto lrt, auto sdt, auto nz) { do_clamp ? launch(lrt, sdt, nz, T{}) : launch(lrt, sdt, nz, F{}); };
      auto with_noise = [&](auto lrt, auto sdt) { noise ? with_clamp(lrt, sdt, T{}) : with_clamp(lrt, sdt, F{}); };
      auto with_sd = [&](auto lrt) { sdp ? with_noise(lrt, T{}) : with_noise(lrt, F{}); };
      lrp ? with_sd(T{}) : with_sd(F{});
      return;
    }
    const int64_t C = x.size(1), H = x.size(2), W = x.size(3);
    TORCH_CHECK(W <= kTVThreads * kTVItems, "langevin_step_ (cuda backend): the fused TV prior supports W <= ",
                kTVThreads * kTVItems, ", got W=", W);
    TORCH_CHECK(N * C <= 2147483647LL, "langevin_step_ (cuda backend): too many planes");
    const double terms = static_cast<double>(N * C) * static_cast<double>((H - 1) * W + H * (W - 1));
    const acc_t tvs = static_cast<acc_t>(tv_weight / terms);
    const int R = static_cast<int>(std::max<int64_t>(1, (kTVThreads * kTVItems) / W));
    const size_t shmem = sizeof(acc_t) * static_cast<size_t>(W);
    auto launch = [&](auto lrt, auto sdt, auto nz, auto cl, auto pc) {
      FKD_LAUNCH(static_cast<unsigned>(N * C), kTVThreads, shmem, stream,
                 step_tv_kernel<scalar_t, acc_t, decltype(lrt)::value, decltype(sdt)::value, decltype(nz)::value,
                                decltype(cl)::value, decltype(pc)::value>)(
          xp, gp, C, static_cast<int>(H), static_cast<int>(W), R, lrp, alr, sdp, asd, alo, ahi, tvs, k0, k1);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    };
    using P1 = std::integral_constant<int, 1>;
    using P2 = std::integral_constant<int, 2>;
    auto with_p = [&](auto lrt, auto sdt, auto nz, auto cl) {
      tv_p == 1 ? launch(lrt, sdt, nz, cl, P1{}) : launch(lrt, sdt, nz, cl, P2{});
    };
    auto with_clamp = [&](auto lrt, auto sdt, auto nz) { do_clamp ? with_p(lrt, sdt, nz, T{}) : with_p(lrt, sdt, nz, F{}); };
    auto with_noise = [&](auto lrt, auto sdt) { noise ? with_clamp(lrt, sdt, T{}) : with_clamp(lrt, sdt, F{}); };
    auto with_sd = [&](auto lrt) { sdp ? with_noise(lrt, T{}) : with_noise(lrt, F{}); };
    lrp ? with_sd(T{}) : with_sd(F{});
  });
}

}  // namespace fastkd

TORCH_LIBRARY_IMPL(fastkd, CUDA, m) {
  m.impl("langevin_step_", &fastkd::langevin_step_cuda);
}
