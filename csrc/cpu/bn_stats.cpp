// BatchNorm-statistics loss on the CPU.
//
// x is viewed as (N, C, S) with S = H*W (S = 1 for (N, C) input).
// Forward, large planes (S >= kPlaneMin): (n, c) planes run in parallel; each plane is
// read twice while it sits in cache (sum, then sum of squared deviations from the plane
// mean), with kLanes independent partial sums so the loops vectorise without
// reassociation. Planes are combined per channel in double with Chan's formula (all
// planes have the same count). Small planes (and (N, C) input): rows of length C*S are
// accumulated position-wise (shifted by the first row, in double) by row chunks in
// parallel, then folded per channel. Backward: one pass, grad = a_c + b_c * (x - mu_c).
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "bn_stats.h"

namespace fastkd {
namespace {

constexpr int kLanes = 16;
constexpr int64_t kPlaneMin = 32;

template <typename acc_t>
inline acc_t lane_sum(const acc_t* __restrict__ p, int64_t S) {
  acc_t a[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= S; i += kLanes)
    for (int k = 0; k < kLanes; ++k) a[k] += p[i + k];
  acc_t s = acc_t(0);
  for (int k = 0; k < kLanes; ++k) s += a[k];
  for (; i < S; ++i) s += p[i];
  return s;
}

template <typename acc_t>
inline acc_t lane_sq_dev(const acc_t* __restrict__ p, int64_t S, acc_t m) {
  acc_t a[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= S; i += kLanes)
    for (int k = 0; k < kLanes; ++k) {
      const acc_t d = p[i + k] - m;
      a[k] += d * d;
    }
  acc_t s = acc_t(0);
  for (int k = 0; k < kLanes; ++k) s += a[k];
  for (; i < S; ++i) {
    const acc_t d = p[i] - m;
    s += d * d;
  }
  return s;
}

// Per-channel mean and M2 (sum of squared deviations) in double.
template <typename scalar_t>
void stats_planes(const scalar_t* xp, int64_t N, int64_t C, int64_t S, std::vector<double>& mean,
                  std::vector<double>& m2) {
  using acc_t = at::opmath_type<scalar_t>;
  std::vector<double> pm(N * C), pq(N * C);
  const int64_t grain = std::max<int64_t>(1, 32768 / S);
  at::parallel_for(0, N * C, grain, [&](int64_t b, int64_t e) {
    std::vector<acc_t> buf(std::is_same_v<scalar_t, acc_t> ? 0 : S);
    for (int64_t i = b; i < e; ++i) {
      const scalar_t* src = xp + i * S;
      const acc_t* p;
      if constexpr (std::is_same_v<scalar_t, acc_t>) {
        p = src;
      } else {
        for (int64_t s = 0; s < S; ++s) buf[s] = static_cast<acc_t>(src[s]);
        p = buf.data();
      }
      const acc_t m = lane_sum(p, S) / static_cast<acc_t>(S);
      pm[i] = static_cast<double>(m);
      pq[i] = static_cast<double>(lane_sq_dev(p, S, m));
    }
  });
  for (int64_t c = 0; c < C; ++c) {
    double mu = 0.0;
    for (int64_t n = 0; n < N; ++n) mu += pm[n * C + c];
    mu /= static_cast<double>(N);
    double q = 0.0, between = 0.0;
    for (int64_t n = 0; n < N; ++n) {
      q += pq[n * C + c];
      const double d = pm[n * C + c] - mu;
      between += d * d;
    }
    mean[c] = mu;
    m2[c] = q + between * static_cast<double>(S);
  }
}

template <typename scalar_t>
void stats_rows(const scalar_t* xp, int64_t N, int64_t C, int64_t S, std::vector<double>& mean,
                std::vector<double>& m2) {
  const int64_t L = C * S;
  std::vector<double> K(L);
  for (int64_t j = 0; j < L; ++j) K[j] = static_cast<double>(xp[j]);
  const int64_t T = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(),
                                                           (N * L + 65535) / 65536));
  std::vector<double> s1(T * L, 0.0), s2(T * L, 0.0);
  at::parallel_for(0, T, 1, [&](int64_t tb, int64_t te) {
    for (int64_t t = tb; t < te; ++t) {
      const int64_t r0 = N * t / T, r1 = N * (t + 1) / T;
      double* __restrict__ a1 = s1.data() + t * L;
      double* __restrict__ a2 = s2.data() + t * L;
      const double* __restrict__ k = K.data();
      for (int64_t r = r0; r < r1; ++r) {
        const scalar_t* __restrict__ row = xp + r * L;
        for (int64_t j = 0; j < L; ++j) {
          const double d = static_cast<double>(row[j]) - k[j];
          a1[j] += d;
          a2[j] += d * d;
        }
      }
    }
  });
  const double n = static_cast<double>(N);
  for (int64_t c = 0; c < C; ++c) {
    // Positions of channel c: j = c*S + s, each with N samples.
    std::vector<double> pm(S), pq(S);
    double mu = 0.0;
    for (int64_t s = 0; s < S; ++s) {
      const int64_t j = c * S + s;
      double t1 = 0.0, t2 = 0.0;
      for (int64_t t = 0; t < T; ++t) { t1 += s1[t * L + j]; t2 += s2[t * L + j]; }
      pm[s] = K[j] + t1 / n;
      pq[s] = std::max(0.0, t2 - t1 * t1 / n);
      mu += pm[s];
    }
    mu /= static_cast<double>(S);
    double q = 0.0;
    for (int64_t s = 0; s < S; ++s) {
      const double d = pm[s] - mu;
      q += pq[s] + n * d * d;
    }
    mean[c] = mu;
    m2[c] = q;
  }
}

template <typename scalar_t, typename acc_t>
void bwd_planes(const scalar_t* xp, scalar_t* gp, int64_t N, int64_t C, int64_t S, const acc_t* a,
                const acc_t* b, const acc_t* mu) {
  const int64_t grain = std::max<int64_t>(1, 32768 / S);
  at::parallel_for(0, N * C, grain, [&](int64_t bb, int64_t e) {
    for (int64_t i = bb; i < e; ++i) {
      const int64_t c = i % C;
      const acc_t ac = a[c], bc = b[c], mc = mu[c];
      const scalar_t* __restrict__ src = xp + i * S;
      scalar_t* __restrict__ dst = gp + i * S;
      for (int64_t s = 0; s < S; ++s)
        dst[s] = static_cast<scalar_t>(ac + bc * (static_cast<acc_t>(src[s]) - mc));
    }
  });
}

template <typename scalar_t, typename acc_t>
void bwd_rows(const scalar_t* xp, scalar_t* gp, int64_t N, int64_t C, int64_t S, const acc_t* a,
              const acc_t* b, const acc_t* mu) {
  const int64_t L = C * S;
  std::vector<acc_t> A(L), Bv(L), M(L);
  for (int64_t j = 0; j < L; ++j) { A[j] = a[j / S]; Bv[j] = b[j / S]; M[j] = mu[j / S]; }
  const int64_t grain = std::max<int64_t>(1, 32768 / L);
  at::parallel_for(0, N, grain, [&](int64_t rb, int64_t re) {
    const acc_t* __restrict__ pa = A.data();
    const acc_t* __restrict__ pb = Bv.data();
    const acc_t* __restrict__ pmu = M.data();
    for (int64_t r = rb; r < re; ++r) {
      const scalar_t* __restrict__ src = xp + r * L;
      scalar_t* __restrict__ dst = gp + r * L;
      for (int64_t j = 0; j < L; ++j)
        dst[j] = static_cast<scalar_t>(pa[j] + pb[j] * (static_cast<acc_t>(src[j]) - pmu[j]));
    }
  });
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> bn_stats_fwd_cpu(
    const at::Tensor& x_in, const at::Tensor& rm_in, const at::Tensor& rv_in) {
  bn_stats_check(x_in, rm_in, rv_in);
  TORCH_CHECK(x_in.device().is_cpu(), "bn_stats_loss (cpp backend): x must be a CPU tensor");
  const at::Tensor x = x_in.contiguous();
  const at::Tensor rm = rm_in.contiguous().to(at::kDouble);
  const at::Tensor rv = rv_in.contiguous().to(at::kDouble);
  const int64_t N = x.size(0), C = x.size(1), S = bn_plane_size(x);
  std::vector<double> mean(C), m2(C);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "bn_stats_fwd_cpu", [&] {
    if (S >= kPlaneMin) stats_planes<scalar_t>(x.const_data_ptr<scalar_t>(), N, C, S, mean, m2);
    else stats_rows<scalar_t>(x.const_data_ptr<scalar_t>(), N, C, S, mean, m2);
  });
  const double M = static_cast<double>(N) * static_cast<double>(S);
  const double* prm = rm.const_data_ptr<double>();
  const double* prv = rv.const_data_ptr<double>();
  const auto acc = bn_acc_type(x.scalar_type());
  at::Tensor mean_t = at::empty({C}, x.options().dtype(at::kDouble));
  at::Tensor var_t = at::empty({C}, x.options().dtype(at::kDouble));
  double* pmean = mean_t.mutable_data_ptr<double>();
  double* pvar = var_t.mutable_data_ptr<double>();
  double dm = 0.0, dv = 0.0;
  for (int64_t c = 0; c < C; ++c) {
    pmean[c] = mean[c];
    pvar[c] = m2[c] / M;
    const double a = pmean[c] - prm[c], b = pvar[c] - prv[c];
    dm += a * a;
    dv += b * b;
  }
  at::Tensor norms = at::empty({2}, x.options().dtype(at::kDouble));
  norms.mutable_data_ptr<double>()[0] = std::sqrt(dm);
  norms.mutable_data_ptr<double>()[1] = std::sqrt(dv);
  at::Tensor loss = at::scalar_tensor(std::sqrt(dm) + std::sqrt(dv), x.options().dtype(at::kDouble));
  return {loss.to(x.scalar_type()), mean_t.to(acc), var_t.to(acc), norms.to(acc)};
}

at::Tensor bn_stats_bwd_cpu(const at::Tensor& grad, const at::Tensor& x_in, const at::Tensor& mean,
                            const at::Tensor& var, const at::Tensor& rm, const at::Tensor& rv,
                            const at::Tensor& norms) {
  bn_stats_check(x_in, rm, rv);
  TORCH_CHECK(x_in.device().is_cpu(), "bn_stats_loss (cpp backend): x must be a CPU tensor");
  TORCH_CHECK(grad.numel() == 1, "bn_stats_loss: the incoming gradient must be a scalar");
  const at::Tensor x = x_in.contiguous();
  const int64_t N = x.size(0), C = x.size(1), S = bn_plane_size(x);
  at::Tensor gx = at::empty_like(x, at::MemoryFormat::Contiguous);
  const double g = grad.to(at::kDouble).item<double>();
  const at::Tensor md = mean.to(at::kDouble).contiguous(), vd = var.to(at::kDouble).contiguous();
  const at::Tensor rmd = rm.to(at::kDouble).contiguous(), rvd = rv.to(at::kDouble).contiguous();
  const at::Tensor nd = norms.to(at::kDouble).contiguous();
  const double n0 = nd.const_data_ptr<double>()[0], n1 = nd.const_data_ptr<double>()[1];
  const double M = static_cast<double>(N) * static_cast<double>(S);
  const double ka = n0 > 0 ? g / (n0 * M) : 0.0, kb = n1 > 0 ? 2.0 * g / (n1 * M) : 0.0;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "bn_stats_bwd_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    std::vector<acc_t> a(C), b(C), mu(C);
    for (int64_t c = 0; c < C; ++c) {
      a[c] = static_cast<acc_t>(ka * (md.const_data_ptr<double>()[c] - rmd.const_data_ptr<double>()[c]));
      b[c] = static_cast<acc_t>(kb * (vd.const_data_ptr<double>()[c] - rvd.const_data_ptr<double>()[c]));
      mu[c] = static_cast<acc_t>(md.const_data_ptr<double>()[c]);
    }
    if (S >= kPlaneMin)
      bwd_planes<scalar_t, acc_t>(x.const_data_ptr<scalar_t>(), gx.mutable_data_ptr<scalar_t>(), N, C, S,
                                  a.data(), b.data(), mu.data());
    else
      bwd_rows<scalar_t, acc_t>(x.const_data_ptr<scalar_t>(), gx.mutable_data_ptr<scalar_t>(), N, C, S,
                                a.data(), b.data(), mu.data());
  });
  return gx;
}

}  // namespace fastkd

TORCH_LIBRARY_FRAGMENT(fastkd, m) {
  m.def("bn_stats_fwd(Tensor x, Tensor running_mean, Tensor running_var) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def("bn_stats_bwd(Tensor grad, Tensor x, Tensor mean, Tensor var, Tensor running_mean, "
        "Tensor running_var, Tensor norms) -> Tensor");
}

TORCH_LIBRARY_IMPL(fastkd, CPU, m) {
  m.impl("bn_stats_fwd", &fastkd::bn_stats_fwd_cpu);
  m.impl("bn_stats_bwd", &fastkd::bn_stats_bwd_cpu);
}
