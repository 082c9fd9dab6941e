#pragma once
// Branch-free math for the CPU kernels' inner loops (the Langevin noise, the sliced-OT
// directions, Sinkhorn's log-sum-exp): -2 log, sqrt and sin/cos of 2 pi b in float, exp of
// a non-positive number in double, written with bit operations and polynomials so that
// loops calling them vectorise (libm calls do not), plus the function-clone attribute that
// compiles such loops for AVX2+FMA and for the baseline ISA. Accuracy: that of libm's
// functions of the same type (about 1e-7 relative in float, 3e-16 in double).
#include <cmath>
#include <cstdint>
#include <cstring>

namespace fastkd {

// The AVX2+FMA clone is chosen by CPU features, not by CPU model: "arch=haswell" clones
// are dispatched with __builtin_cpu_is and so never run on AMD processors.
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && __GNUC__ >= 12
#define FKD_CLONES __attribute__((target_clones("arch=x86-64-v3", "default")))
#elif defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define FKD_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define FKD_CLONES
#endif

#if defined(__GNUC__)
#define FKD_INLINE __attribute__((always_inline)) inline
#else
#define FKD_INLINE inline
#endif

// std::bit_cast is C++20, and torch's cpp_extension compiles with -std=c++17 up to torch
// 2.11. GCC >= 11 and clang >= 9 have the builtin behind it in every language mode (same
// code, loops still vectorise); memcpy is the portable fallback.
#if defined(__has_builtin)
#if __has_builtin(__builtin_bit_cast)
#define FKD_HAVE_BUILTIN_BIT_CAST 1
#endif
#endif

template <class To, class From>
FKD_INLINE To bit_as(const From& v) {
  static_assert(sizeof(To) == sizeof(From), "bit_as: sizes differ");
#ifdef FKD_HAVE_BUILTIN_BIT_CAST
  return __builtin_bit_cast(To, v);
#else
  To out;
  std::memcpy(&out, &v, sizeof(To));
  return out;
#endif
}

// -2 log(a) for a in (0, 1] (a >= 2^-24): exponent + 2 atanh series on [sqrt(1/2), sqrt(2)).
FKD_INLINE float neg2log(float a) {
  const uint32_t bits = bit_as<uint32_t>(a);
  int32_t e = static_cast<int32_t>(bits >> 23) - 127;
  float m = bit_as<float>((bits & 0x007FFFFFu) | 0x3F800000u);
  const int32_t big = static_cast<int32_t>(m > 1.41421356f);  // 0 or 1, no branch
  m = m * (1.0f - 0.5f * static_cast<float>(big));
  e += big;
  const float s = (m - 1.0f) / (m + 1.0f);
  const float s2 = s * s;
  const float poly = 1.0f + s2 * (1.0f / 3 + s2 * (1.0f / 5 + s2 * (1.0f / 7 + s2 * (1.0f / 9))));
  const float lg = static_cast<float>(e) * 0.693147180559945f + 2.0f * s * poly;
  return -2.0f * lg;
}

// sqrt(y) for y >= 0. The extension is compiled with -fno-math-errno, so this is one
// vector square-root instruction. The sign bit is cleared first: neg2log(1) is -0.0f
// (probability 2^-24 per draw) and must give a radius of 0.
FKD_INLINE float sqrt_nn(float y) {
  return std::sqrt(bit_as<float>(bit_as<uint32_t>(y) & 0x7FFFFFFFu));
}

// cos and sin of 2 pi b for b in [0, 1): quadrant reduction, Taylor polynomials on [-pi/4, pi/4].
FKD_INLINE void sincos2pi(float b, float& c, float& s) {
  const float v = b * 4.0f;
  const float qf = static_cast<float>(static_cast<int32_t>(v + 0.5f));  // floor: v + 0.5 > 0
  const float x = (v - qf) * 1.57079632679489662f;
  const int32_t q = static_cast<int32_t>(qf);
  const float x2 = x * x;
  const float sn = x * (1.0f + x2 * (-1.0f / 6 + x2 * (1.0f / 120 + x2 * (-1.0f / 5040 + x2 * (1.0f / 362880)))));
  const float cs = 1.0f + x2 * (-0.5f + x2 * (1.0f / 24 + x2 * (-1.0f / 720 + x2 * (1.0f / 40320 +
                   x2 * (-1.0f / 3628800)))));
  // quadrant q: swap sin/cos for odd q, flip signs by bit 1 of q (sin) and of q + 1 (cos);
  // selects and sign flips as bit operations so that the loop stays branch-free
  const uint32_t swap = 0u - static_cast<uint32_t>(q & 1);
  const uint32_t bs = bit_as<uint32_t>(sn), bc = bit_as<uint32_t>(cs);
  const uint32_t ss = (bc & swap) | (bs & ~swap);
  const uint32_t cc = (bs & swap) | (bc & ~swap);
  s = bit_as<float>(ss ^ (static_cast<uint32_t>(q & 2) << 30));
  c = bit_as<float>(cc ^ (static_cast<uint32_t>((q + 1) & 2) << 30));
}

// exp(x) for x <= 0 in double: x = n ln2 + r (|r| <= ln2 / 2, two-part ln2), degree-12
// Taylor polynomial of exp(r) (truncation ~1e-16), times 2^n built in the exponent bits.
// Inputs below -708 give exp(-708) ~ 3e-308 instead of a denormal or 0 (negligible in a
// sum that holds a 1); NaN propagates.
FKD_INLINE double exp_nonpos(double x) {
  const double xc = x < -708.0 ? -708.0 : x;
  const double t = xc * 1.4426950408889634;
  // round(t) for t <= 0.5 (truncation); int32, since AVX2 has no packed double -> int64
  const int32_t n = static_cast<int32_t>(t - 0.5);
  const double nf = static_cast<double>(n);
  const double r = (xc - nf * 0.6931471803691238) - nf * 1.9082149292705877e-10;
  double p = 1.0 / 479001600.0;
  p = p * r + 1.0 / 39916800.0;
  p = p * r + 1.0 / 3628800.0;
  p = p * r + 1.0 / 362880.0;
  p = p * r + 1.0 / 40320.0;
  p = p * r + 1.0 / 5040.0;
  p = p * r + 1.0 / 720.0;
  p = p * r + 1.0 / 120.0;
  p = p * r + 1.0 / 24.0;
  p = p * r + 1.0 / 6.0;
  p = p * r + 0.5;
  p = p * r + 1.0;
  p = p * r + 1.0;
  return p * bit_as<double>(static_cast<uint64_t>(static_cast<int64_t>(n) + 1023) << 52);
}

}  // namespace fastkd
