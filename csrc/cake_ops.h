#pragma once
// Declarations and device-agnostic helpers of the CAKE/LAKE ops:
//   cross_class_contrastive_fwd  (csrc/cpu/cross_class_contrastive.cpp, csrc/cuda/...)
//   langevin_step_               (csrc/cpu/langevin.cpp, csrc/cuda/langevin.cu)
//
// Noise of langevin_step_: element e of the (contiguous) tensor takes normal number
// e % 4 of block j = e / 4. Block j is Philox4x32-10 with counter (j mod 2^32,
// j / 2^32, 0, 0) and key (seed mod 2^32, seed / 2^32); its four 32-bit outputs u0..u3
// give two Box-Muller pairs: (u0, u1) -> (z0, z1), (u2, u3) -> (z2, z3) with
//   r = sqrt(-2 log a), a = (u_even >> 8 + 1) / 2^24 in (0, 1],
//   theta = 2 pi b,     b = (u_odd >> 8) / 2^24 in [0, 1),
//   z_even = r cos(theta), z_odd = r sin(theta).
// fastkd/ops/langevin.py implements the same stream in plain PyTorch (the reference).
#include <cstdint>
#include <tuple>

#include "fastkd.h"

#if defined(__CUDACC__)
#define FKD_HD __host__ __device__ __forceinline__
#else
#define FKD_HD inline
#endif

namespace fastkd {

std::tuple<at::Tensor, at::Tensor> cross_class_contrastive_fwd_cpu(
    const at::Tensor& outputs, const at::Tensor& labels, const c10::optional<at::Tensor>& groups,
    int64_t reduction, bool need_grad);
std::tuple<at::Tensor, at::Tensor> cross_class_contrastive_fwd_cuda(
    const at::Tensor& outputs, const at::Tensor& labels, const c10::optional<at::Tensor>& groups,
    int64_t reduction, bool need_grad);

void langevin_step_cpu(at::Tensor& x, const at::Tensor& grad, const c10::optional<at::Tensor>& lr_t,
                       double lr, const c10::optional<at::Tensor>& std_t, double noise_std,
                       bool do_clamp, double lo, double hi, double tv_weight, int64_t tv_p, int64_t seed);
void langevin_step_cuda(at::Tensor& x, const at::Tensor& grad, const c10::optional<at::Tensor>& lr_t,
                        double lr, const c10::optional<at::Tensor>& std_t, double noise_std,
                        bool do_clamp, double lo, double hi, double tv_weight, int64_t tv_p,
                        int64_t seed);

// ----------------------------------------------------------------------------- Philox
struct Philox4 {
  uint32_t v[4];
};

FKD_HD void fkd_mulhilo(uint32_t a, uint32_t b, uint32_t& hi, uint32_t& lo) {
  const uint64_t p = static_cast<uint64_t>(a) * static_cast<uint64_t>(b);
  hi = static_cast<uint32_t>(p >> 32);
  lo = static_cast<uint32_t>(p);
}

// Philox4x32-10 of counter (c0, c1, 0, 0) under key (k0, k1).
FKD_HD Philox4 fkd_philox(uint32_t c0, uint32_t c1, uint32_t k0, uint32_t k1) {
  uint32_t x0 = c0, x1 = c1, x2 = 0u, x3 = 0u;
#if defined(__CUDACC__)
#pragma unroll
#endif
  for (int r = 0; r < 10; ++r) {
    uint32_t h0, l0, h1, l1;
    fkd_mulhilo(0xD2511F53u, x0, h0, l0);
    fkd_mulhilo(0xCD9E8D57u, x2, h1, l1);
    const uint32_t y0 = h1 ^ x1 ^ k0, y2 = h0 ^ x3 ^ k1;
    x0 = y0; x1 = l1; x2 = y2; x3 = l0;
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
  return Philox4{{x0, x1, x2, x3}};
}

// Uniforms of the Box-Muller transform (exactly representable in float).
FKD_HD float fkd_u_open0(uint32_t u) { return static_cast<float>((u >> 8) + 1u) * 5.9604644775390625e-8f; }
FKD_HD float fkd_u_open1(uint32_t u) { return static_cast<float>(u >> 8) * 5.9604644775390625e-8f; }

#if defined(__CUDACC__) || defined(FASTKD_CUDA_EMU)
// Box-Muller radius sqrt(-2 log a) for a = fkd_u_open0(.) in (0, 1], on the device. Under
// nvcc's --use_fast_math, logf is an approximate instruction whose absolute error (about
// 1e-7 near 1) can make log(a) >= 0 for a just below 1 (a NaN radius) and moves r by up
// to 4e-4 there. log1pf has no approximate form: log1pf(-(1 - a)), with 1 - a exact in
// float, keeps r accurate; the max() keeps a -0 or rounding from reaching sqrt.
__device__ __forceinline__ float fkd_bm_radius(float a) {
  return sqrtf(fmaxf(-2.0f * log1pf(-(1.0f - a)), 0.0f));
}
#endif

}  // namespace fastkd
