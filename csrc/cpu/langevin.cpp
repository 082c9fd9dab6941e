// Langevin step on the CPU, in place:
//   x <- clamp(x - lr * (grad + tv_weight * d tv_loss(x, p, "mean") / dx) + noise_std * xi)
//
// The normal numbers xi come from a counter-based generator (Philox4x32-10, see
// cake_ops.h), so any element range can be produced independently: each task fills a
// small stack-sized buffer for its own range, no x-sized noise tensor exists. The
// generator works on blocks of counters in structure-of-arrays form and the Box-Muller
// transform uses branch-free polynomial log / sin / cos, so both vectorise; the
// generator function is compiled for x86-64-v3 (AVX2+FMA) and for the baseline ISA and
// the best is picked at load time by CPU features.
//
// The TV gradient needs the old values of a pixel's neighbours. Each (sample, channel)
// plane is walked row by row: the derivative of the vertical term between rows h and
// h+1 is computed while both rows are still old and is reused for row h+1, so rows can
// be overwritten as soon as they are done. All row loops are branch-free.
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "cake_ops.h"
#include "vecmath.h"

namespace fastkd {
namespace {

constexpr int kChunk = 64;  // Philox blocks per generator step (256 normals)

// Normals of Philox blocks [j0, j0 + nblk) into out[0 .. 4 * nblk), in element order.
FKD_CLONES
void normals_blocks(uint64_t seed, uint64_t j0, int64_t nblk, float* __restrict__ out) {
  alignas(64) uint32_t x0[kChunk], x1[kChunk], x2[kChunk], x3[kChunk];
  alignas(64) float z0[kChunk], z1[kChunk], z2[kChunk], z3[kChunk];
  const uint32_t key0 = static_cast<uint32_t>(seed), key1 = static_cast<uint32_t>(seed >> 32);
  for (int64_t base = 0; base < nblk; base += kChunk) {
    const int nb = static_cast<int>(std::min<int64_t>(kChunk, nblk - base));
    const uint64_t j = j0 + static_cast<uint64_t>(base);
    for (int b = 0; b < kChunk; ++b) {
      const uint64_t c = j + static_cast<uint64_t>(b);
      x0[b] = static_cast<uint32_t>(c);
      x1[b] = static_cast<uint32_t>(c >> 32);
      x2[b] = 0u;
      x3[b] = 0u;
    }
    uint32_t k0 = key0, k1 = key1;
    for (int r = 0; r < 10; ++r) {
      for (int b = 0; b < kChunk; ++b) {
        const uint64_t p0 = static_cast<uint64_t>(0xD2511F53u) * x0[b];
        const uint64_t p1 = static_cast<uint64_t>(0xCD9E8D57u) * x2[b];
        const uint32_t y0 = static_cast<uint32_t>(p1 >> 32) ^ x1[b] ^ k0;
        const uint32_t y2 = static_cast<uint32_t>(p0 >> 32) ^ x3[b] ^ k1;
        x1[b] = static_cast<uint32_t>(p1);
        x3[b] = static_cast<uint32_t>(p0);
        x0[b] = y0;
        x2[b] = y2;
      }
      k0 += 0x9E3779B9u;
      k1 += 0xBB67AE85u;
    }
    for (int b = 0; b < kChunk; ++b) {
      const float ra = sqrt_nn(neg2log(fkd_u_open0(x0[b])));
      const float rb = sqrt_nn(neg2log(fkd_u_open0(x2[b])));
      float ca, sa, cb, sb;
      sincos2pi(fkd_u_open1(x1[b]), ca, sa);
      sincos2pi(fkd_u_open1(x3[b]), cb, sb);
      z0[b] = ra * ca;
      z1[b] = ra * sa;
      z2[b] = rb * cb;
      z3[b] = rb * sb;
    }
    float* o = out + 4 * base;
    for (int b = 0; b < nb; ++b) {
      o[4 * b + 0] = z0[b];
      o[4 * b + 1] = z1[b];
      o[4 * b + 2] = z2[b];
      o[4 * b + 3] = z3[b];
    }
  }
}

// Normals of elements [e0, e0 + n) into buf (which must hold n + 8 floats); returns the
// pointer to element e0's normal.
inline const float* normals_range(uint64_t seed, int64_t e0, int64_t n, float* buf) {
  const int64_t j0 = e0 >> 2, j1 = (e0 + n - 1) >> 2;
  normals_blocks(seed, static_cast<uint64_t>(j0), j1 - j0 + 1, buf);
  return buf + (e0 & 3);
}

template <typename acc_t, int P>
inline acc_t tvg(acc_t d) {
  if constexpr (P == 1) return static_cast<acc_t>(d > acc_t(0)) - static_cast<acc_t>(d < acc_t(0));
  else return acc_t(2) * d;
}

template <typename scalar_t, typename acc_t, bool CLAMP>
inline void update_run(scalar_t* __restrict__ x, const scalar_t* __restrict__ g,
                       const float* __restrict__ z, int64_t n, acc_t lr, acc_t sd, acc_t lo, acc_t hi) {
  for (int64_t i = 0; i < n; ++i) {
    acc_t v = static_cast<acc_t>(x[i]) - lr * static_cast<acc_t>(g[i]) + sd * static_cast<acc_t>(z[i]);
    if constexpr (CLAMP) v = std::min(std::max(v, lo), hi);
    x[i] = static_cast<scalar_t>(v);
  }
}

template <typename scalar_t, typename acc_t, bool CLAMP, bool NOISE, int P>
void tv_plane_step(scalar_t* __restrict__ xs, const scalar_t* __restrict__ gs, const float* __restrict__ z,
                   int64_t H, int64_t W, acc_t lr, acc_t sd, acc_t tvs, acc_t lo, acc_t hi,
                   acc_t* __restrict__ rowbuf) {
  // rowbuf: th[-1 .. W], vc[-0 .. W), vp[0 .. W), xr[0 .. W)
  acc_t* th = rowbuf + 1;
  acc_t* vc = rowbuf + (W + 2);
  acc_t* vp = vc + W;
  acc_t* xr = vp + W;
  th[-1] = acc_t(0);
  th[W - 1] = acc_t(0);
  for (int64_t w = 0; w < W; ++w) vp[w] = acc_t(0);
  for (int64_t h = 0; h < H; ++h) {
    scalar_t* __restrict__ r = xs + h * W;
    const scalar_t* __restrict__ dn = r + W;
    for (int64_t w = 0; w < W; ++w) xr[w] = static_cast<acc_t>(r[w]);
    for (int64_t w = 0; w + 1 < W; ++w) th[w] = tvg<acc_t, P>(xr[w + 1] - xr[w]);
    if (h + 1 < H) {
      for (int64_t w = 0; w < W; ++w) vc[w] = tvg<acc_t, P>(static_cast<acc_t>(dn[w]) - xr[w]);
    } else {
      for (int64_t w = 0; w < W; ++w) vc[w] = acc_t(0);
    }
    const scalar_t* __restrict__ gr = gs + h * W;
    const float* __restrict__ zr = NOISE ? z + h * W : nullptr;
    for (int64_t w = 0; w < W; ++w) {
      const acc_t gt = (th[w - 1] - th[w]) + (vp[w] - vc[w]);
      acc_t v = xr[w] - lr * (static_cast<acc_t>(gr[w]) + tvs * gt);
      if constexpr (NOISE) v += sd * static_cast<acc_t>(zr[w]);
      if constexpr (CLAMP) v = std::min(std::max(v, lo), hi);
      r[w] = static_cast<scalar_t>(v);
    }
    std::swap(vc, vp);
  }
}

template <typename scalar_t>
void run_step(at::Tensor& x, const at::Tensor& grad, const double* lr_p, double lr, const double* sd_p,
              double sd, bool do_clamp, double lo, double hi, double tv_weight, int64_t tv_p,
              uint64_t seed) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t N = x.size(0);
  const int64_t per = N > 0 ? x.numel() / N : 0;
  scalar_t* xp = x.mutable_data_ptr<scalar_t>();
  const scalar_t* gp = grad.const_data_ptr<scalar_t>();
  const bool noise = sd_p != nullptr || sd != 0.0;
  const acc_t alo = static_cast<acc_t>(lo), ahi = static_cast<acc_t>(hi);
  auto lr_of = [&](int64_t n) { return static_cast<acc_t>(lr_p ? lr_p[n] : lr); };
  auto sd_of = [&](int64_t n) { return static_cast<acc_t>(sd_p ? sd_p[n] : sd); };

  if (tv_weight != 0.0) {
    const int64_t C = x.size(1), H = x.size(2), W = x.size(3), HW = H * W;
    const double terms = static_cast<double>(N * C) * static_cast<double>((H - 1) * W + H * (W - 1));
    const acc_t tvs = static_cast<acc_t>(tv_weight / terms);
    const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(1, HW));
    at::parallel_for(0, N * C, grain, [&](int64_t begin, int64_t end) {
      std::vector<float> zbuf(noise ? HW + 8 : 0);
      std::vector<acc_t> rows(4 * W + 2);
      for (int64_t i = begin; i < end; ++i) {
        const int64_t n = i / C;
        const float* z = noise ? normals_range(seed, i * HW, HW, zbuf.data()) : nullptr;
        auto go = [&](auto clamp_c, auto noise_c, auto p_c) {
          tv_plane_step<scalar_t, acc_t, decltype(clamp_c)::value, decltype(noise_c)::value,
                        decltype(p_c)::value>(xp + i * HW, gp + i * HW, z, H, W, lr_of(n), sd_of(n),
                                              tvs, alo, ahi, rows.data());
        };
        using T = std::true_type;
        using F = std::false_type;
        using P1 = std::integral_constant<int, 1>;
        using P2 = std::integral_constant<int, 2>;
        if (tv_p == 1) {
          if (do_clamp) { noise ? go(T{}, T{}, P1{}) : go(T{}, F{}, P1{}); }
          else          { noise ? go(F{}, T{}, P1{}) : go(F{}, F{}, P1{}); }
        } else {
          if (do_clamp) { noise ? go(T{}, T{}, P2{}) : go(T{}, F{}, P2{}); }
          else          { noise ? go(F{}, T{}, P2{}) : go(F{}, F{}, P2{}); }
        }
      }
    });
    return;
  }

  // Element-wise: tasks are chunks of one sample.
  constexpr int64_t kTask = 8192, kSub = 1024;
  const int64_t tps = (per + kTask - 1) / kTask;
  at::parallel_for(0, N * tps, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> zbuf(kSub + 8, 0.0f);
    for (int64_t t = begin; t < end; ++t) {
      const int64_t n = t / tps, c = t % tps;
      const int64_t e0 = n * per + c * kTask;
      const int64_t len = std::min<int64_t>(kTask, per - c * kTask);
      const acc_t sdn = noise ? sd_of(n) : acc_t(0);
      // sub-chunks keep the normals buffer in L1 while x and grad stream through
      for (int64_t o = 0; o < len; o += kSub) {
        const int64_t m = std::min<int64_t>(kSub, len - o);
        const float* z = noise ? normals_range(seed, e0 + o, m, zbuf.data()) : zbuf.data();
        if (do_clamp) update_run<scalar_t, acc_t, true>(xp + e0 + o, gp + e0 + o, z, m, lr_of(n), sdn, alo, ahi);
        else update_run<scalar_t, acc_t, false>(xp + e0 + o, gp + e0 + o, z, m, lr_of(n), sdn, alo, ahi);
      }
    }
  });
}

}  // namespace

void langevin_step_cpu(at::Tensor& x, const at::Tensor& grad_in, const c10::optional<at::Tensor>& lr_t,
                       double lr, const c10::optional<at::Tensor>& std_t, double noise_std,
                       bool do_clamp, double lo, double hi, double tv_weight, int64_t tv_p, int64_t seed) {
  TORCH_CHECK(x.device().is_cpu() && grad_in.device().is_cpu(),
              "langevin_step_ (cpp backend): x and grad must be CPU tensors");
  TORCH_CHECK(x.sizes() == grad_in.sizes(), "langevin_step_: grad must have x's shape");
  TORCH_CHECK(x.scalar_type() == grad_in.scalar_type(), "langevin_step_: grad must have x's dtype");
  TORCH_CHECK(x.is_contiguous(), "langevin_step_ (cpp backend): x must be contiguous");
  TORCH_CHECK(x.dim() >= 1, "langevin_step_: x must have a batch dimension");
  TORCH_CHECK(tv_weight == 0.0 || (x.dim() == 4 && (tv_p == 1 || tv_p == 2)),
              "langevin_step_: the TV prior needs x of shape (N, C, H, W) and tv_p 1 or 2");
  if (x.numel() == 0) return;
  const at::Tensor grad = grad_in.contiguous();
  at::Tensor lr_f, sd_f;
  const int64_t N = x.size(0);
  if (lr_t.has_value()) {
    lr_f = lr_t->to(at::kDouble).contiguous();  // exact for every dtype; cast to the accumulation type per use
    TORCH_CHECK(lr_f.numel() == N, "langevin_step_: lr tensor must have shape (N,)");
  }
  if (std_t.has_value()) {
    sd_f = std_t->to(at::kDouble).contiguous();
    TORCH_CHECK(sd_f.numel() == N, "langevin_step_: noise_std tensor must have shape (N,)");
  }
  const double* lr_p = lr_t.has_value() ? lr_f.const_data_ptr<double>() : nullptr;
  const double* sd_p = std_t.has_value() ? sd_f.const_data_ptr<double>() : nullptr;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "langevin_step_cpu", [&] {
    run_step<scalar_t>(x, grad, lr_p, lr, sd_p, noise_std, do_clamp, lo, hi, tv_weight, tv_p,
                       static_cast<uint64_t>(seed));
  });
}

// Writes the generator's normals of elements [offset, offset + n) (for tests and for the
// noise-statistics checks; the step itself never materialises them).
at::Tensor philox_normal_cpu(int64_t n, int64_t seed, int64_t offset) {
  TORCH_CHECK(n >= 0 && offset >= 0, "philox_normal: n and offset must be non-negative");
  at::Tensor out = at::empty({n}, at::TensorOptions().dtype(at::kFloat));
  if (n == 0) return out;
  float* op = out.mutable_data_ptr<float>();
  constexpr int64_t kTask = 8192;
  at::parallel_for(0, (n + kTask - 1) / kTask, 1, [&](int64_t b, int64_t e) {
    std::vector<float> buf(kTask + 8);
    for (int64_t t = b; t < e; ++t) {
      const int64_t len = std::min<int64_t>(kTask, n - t * kTask);
      const float* z = normals_range(static_cast<uint64_t>(seed), offset + t * kTask, len, buf.data());
      std::memcpy(op + t * kTask, z, sizeof(float) * len);
    }
  });
  return out;
}

}  // namespace fastkd

TORCH_LIBRARY_FRAGMENT(fastkd, m) {
  m.def("langevin_step_(Tensor(a!) x, Tensor grad, Tensor? lr_t, float lr, Tensor? std_t, float noise_std, "
        "bool do_clamp, float lo, float hi, float tv_weight, int tv_p, int seed) -> ()");
  m.def("philox_normal(int n, int seed, int offset) -> Tensor");
}

TORCH_LIBRARY_IMPL(fastkd, CPU, m) {
  m.impl("langevin_step_", &fastkd::langevin_step_cpu);
}

TORCH_LIBRARY_IMPL(fastkd, CompositeExplicitAutograd, m) {
  m.impl("philox_normal", &fastkd::philox_normal_cpu);
}
