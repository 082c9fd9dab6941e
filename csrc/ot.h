#pragma once
// Declarations of the image-matching and empirical optimal transport ops
// (image_distance, pairwise_sqdist, sliced projections, assignment, Sinkhorn).
#include "fastkd.h"

#include <cstdint>
#include <tuple>

namespace fastkd {

// Paired distance. Returns (loss, grad_a); grad_b = -grad_a. See fastkd/ops/image_distance.py.
std::tuple<at::Tensor, at::Tensor> image_distance_fwd_cpu(const at::Tensor& a, const at::Tensor& b,
                                                          int64_t p, int64_t reduction, bool need_grad);
std::tuple<at::Tensor, at::Tensor> image_distance_fwd_cuda(const at::Tensor& a, const at::Tensor& b,
                                                           int64_t p, int64_t reduction, bool need_grad);

// Gradients of sum_ij grad_ij ||a_i - b_j||^2 with respect to a and b (an empty tensor for
// one not needed): ga = 2 (r * a - grad b), r = grad 1, and the same for b with grad^T.
// ATen calls only, so the same function serves the CPU and CUDA backends.
std::tuple<at::Tensor, at::Tensor> pairwise_sqdist_bwd(const at::Tensor& grad, const at::Tensor& a,
                                                       const at::Tensor& b, bool need_a, bool need_b);

// Counter-based normal numbers shared by every backend (and by the Python reference):
// z(seed, l, d) for direction l and coordinate d.
#if defined(__CUDACC__)
#define FASTKD_HD __host__ __device__ __forceinline__
#else
#define FASTKD_HD inline
#endif

FASTKD_HD uint32_t ot_hash32(uint32_t x) {
  x ^= x >> 16;
  x *= 0x7feb352dU;
  x ^= x >> 15;
  x *= 0x846ca68bU;
  x ^= x >> 16;
  return x;
}
// Key of direction l for a 32-bit seed.
FASTKD_HD uint32_t ot_dir_key(uint32_t seed, uint32_t l) {
  return ot_hash32(ot_hash32(seed) ^ (l * 0x9E3779B9U));
}
// Standard normal number of coordinate d of the direction with key k (Box-Muller, fp32).
// The two Box-Muller uniforms of coordinate d: u1 in (0, 1] (radius), u2 in [0, 1) (angle).
FASTKD_HD void ot_uniforms(uint32_t key, uint32_t d, float& u1, float& u2) {
  const uint32_t h1 = ot_hash32(key ^ (2U * d));
  const uint32_t h2 = ot_hash32(key ^ (2U * d + 1U));
  u1 = static_cast<float>((h1 >> 8) + 1U) * 5.9604644775390625e-08f;
  u2 = static_cast<float>(h2 >> 8) * 5.9604644775390625e-08f;
}

FASTKD_HD float ot_normal(uint32_t key, uint32_t d) {
  float u1, u2;
  ot_uniforms(key, d, u1, u2);
#if defined(__CUDA_ARCH__) || defined(FASTKD_CUDA_EMU)
  // The device code is built with --use_fast_math, which makes logf and cosf approximate
  // instructions: log1pf(-(1 - u1)) (1 - u1 exact) has no approximate form and cannot come
  // out >= 0 for u1 just below 1 (a NaN radius), and cospif reduces its argument exactly.
  return sqrtf(fmaxf(-2.0f * log1pf(-(1.0f - u1)), 0.0f)) * cospif(2.0f * u2);
#else
  return sqrtf(-2.0f * logf(u1)) * cosf(6.2831853071795864f * u2);
#endif
}

}  // namespace fastkd
