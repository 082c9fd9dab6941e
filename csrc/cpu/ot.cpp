// Empirical optimal transport on the CPU: the pairwise squared-distance matrix, sliced
// projections with directions generated on the fly, an assignment solver and log-domain
// Sinkhorn iterations. The Python side (fastkd/ops/ot.py) defines what each computes.
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "fastkd.h"
#include "ot.h"
#include "vecmath.h"

namespace fastkd {
namespace {

// Relative threshold under which the GEMM form ||a||^2 + ||b||^2 - 2 a.b is not trusted
// (it has cancelled) and the distance is recomputed directly from the differences.
template <typename T> constexpr double cancel_tau() { return 1.0 / 64.0; }
template <> constexpr double cancel_tau<double>() { return 1e-7; }

// q = p - m over one row of length D; returns sum q^2 (fp32 blocks of 1024 added in double).
template <typename ct>
double centre_row(const ct* __restrict__ p, const ct* __restrict__ m, ct* __restrict__ q, int64_t D) {
  double s = 0.0;
  for (int64_t k0 = 0; k0 < D; k0 += 1024) {
    const int64_t k1 = std::min<int64_t>(D, k0 + 1024);
    ct acc = 0;
    for (int64_t k = k0; k < k1; ++k) {
      const ct v = p[k] - m[k];
      q[k] = v;
      acc += v * v;
    }
    s += static_cast<double>(acc);
  }
  return s;
}

#if defined(__GNUC__)
// fp32: explicit 4-lane vectors (GCC/Clang vector extensions), two accumulators. The plain
// loop above stays scalar because a float sum may not be reassociated without fast-math.
template <>
double centre_row<float>(const float* __restrict__ p, const float* __restrict__ m, float* __restrict__ q,
                         int64_t D) {
  typedef float v4 __attribute__((vector_size(16)));
  double s = 0.0;
  for (int64_t k0 = 0; k0 < D; k0 += 1024) {
    const int64_t k1 = std::min<int64_t>(D, k0 + 1024);
    v4 a0 = {0, 0, 0, 0}, a1 = {0, 0, 0, 0};
    int64_t k = k0;
    for (; k + 8 <= k1; k += 8) {
      v4 x0, x1, y0, y1;
      __builtin_memcpy(&x0, p + k, 16);
      __builtin_memcpy(&x1, p + k + 4, 16);
      __builtin_memcpy(&y0, m + k, 16);
      __builtin_memcpy(&y1, m + k + 4, 16);
      const v4 d0 = x0 - y0, d1 = x1 - y1;
      __builtin_memcpy(q + k, &d0, 16);
      __builtin_memcpy(q + k + 4, &d1, 16);
      a0 += d0 * d0;
      a1 += d1 * d1;
    }
    const v4 t = a0 + a1;
    float acc = (t[0] + t[2]) + (t[1] + t[3]);
    for (; k < k1; ++k) {
      const float v = p[k] - m[k];
      q[k] = v;
      acc += v * v;
    }
    s += static_cast<double>(acc);
  }
  return s;
}
#endif

// xc = x - mu row by row, and the squared norms of the centred rows: one pass over x.
template <typename ct>
void center_rows(const ct* x, const ct* mu, ct* xc, int64_t R, int64_t D, double* out) {
  at::parallel_for(0, R, 1, [&](int64_t b, int64_t e) {
    for (int64_t r = b; r < e; ++r) out[r] = centre_row<ct>(x + r * D, mu, xc + r * D, D);
  });
}

}  // namespace

at::Tensor pairwise_sqdist_fwd_cpu(const at::Tensor& a_in, const at::Tensor& b_in) {
  TORCH_CHECK(a_in.dim() == 2 && b_in.dim() == 2 && a_in.size(1) == b_in.size(1),
              "pairwise_sqdist: a (N, D) and b (M, D) expected");
  TORCH_CHECK(a_in.scalar_type() == b_in.scalar_type() && at::isFloatingType(a_in.scalar_type()),
              "pairwise_sqdist: a and b must be floating point of the same dtype");
  TORCH_CHECK(a_in.device().is_cpu() && b_in.device().is_cpu(), "pairwise_sqdist (cpp backend): CPU tensors expected");
  const auto ct = a_in.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const at::Tensor a = a_in.to(ct).contiguous(), b = b_in.to(ct).contiguous();
  const int64_t N = a.size(0), M = b.size(0), D = a.size(1);
  // Centre both sets on their common mean: distances do not change, norms shrink, and
  // the cancellation in the GEMM form shrinks with them.
  // Any centre will do (distances are translation invariant), so the mean is taken in ct.
  const at::Tensor mu = (a.sum(0) + b.sum(0)) / static_cast<double>(std::max<int64_t>(1, N + M));
  at::Tensor ac = at::empty_like(a), bc = at::empty_like(b), G;
  std::vector<double> na(N), nb(M);
  at::Tensor out = at::empty({N, M}, a.options());
  AT_DISPATCH_FLOATING_TYPES(ct, "pairwise_sqdist_fwd_cpu", [&] {
    const at::Tensor muc = mu.contiguous();
    center_rows<scalar_t>(a.const_data_ptr<scalar_t>(), muc.const_data_ptr<scalar_t>(),
                          ac.mutable_data_ptr<scalar_t>(), N, D, na.data());
    center_rows<scalar_t>(b.const_data_ptr<scalar_t>(), muc.const_data_ptr<scalar_t>(),
                          bc.mutable_data_ptr<scalar_t>(), M, D, nb.data());
    G = at::mm(ac, bc.t());
    const scalar_t* gp = G.const_data_ptr<scalar_t>();
    const scalar_t* ap = a.const_data_ptr<scalar_t>();
    const scalar_t* bp = b.const_data_ptr<scalar_t>();
    scalar_t* op = out.mutable_data_ptr<scalar_t>();
    const double tau = cancel_tau<scalar_t>();
    at::parallel_for(0, N, 1, [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i) {
        for (int64_t j = 0; j < M; ++j) {
          double d = na[i] + nb[j] - 2.0 * static_cast<double>(gp[i * M + j]);
          if (d <= tau * (na[i] + nb[j])) {  // cancelled: recompute from the differences
            const scalar_t* x = ap + i * D;
            const scalar_t* y = bp + j * D;
            double s = 0.0;
            for (int64_t k = 0; k < D; ++k) {
              const double t = static_cast<double>(x[k]) - static_cast<double>(y[k]);
              s += t * t;
            }
            d = s;
          }
          op[i * M + j] = static_cast<scalar_t>(d < 0.0 ? 0.0 : d);  // NaN stays NaN
        }
      }
    });
  });
  return out.to(a_in.scalar_type());
}

std::tuple<at::Tensor, at::Tensor> pairwise_sqdist_bwd(const at::Tensor& grad, const at::Tensor& a_in,
                                                       const at::Tensor& b_in, bool need_a, bool need_b) {
  TORCH_CHECK(a_in.dim() == 2 && b_in.dim() == 2 && grad.dim() == 2 && grad.size(0) == a_in.size(0) &&
                  grad.size(1) == b_in.size(0) && a_in.size(1) == b_in.size(1),
              "pairwise_sqdist backward: grad (N, M), a (N, D) and b (M, D) expected");
  const auto st = a_in.scalar_type();
  const auto ct = (st == at::kHalf || st == at::kBFloat16) ? at::kFloat : st;
  const at::Tensor a = a_in.to(ct), b = b_in.to(ct), g = grad.to(ct);
  at::Tensor ga = at::empty({0}, a_in.options()), gb = at::empty({0}, b_in.options());
  const at::NoTF32Guard full_fp32;  // CUDA tensors: fp32 products whatever the TF32 setting
  if (need_a) {  // -2 g b, then + 2 r_i a_i in place: no N x D temporary besides the result
    at::Tensor t = at::mm(g, b).mul_(-2.0);
    t.addcmul_(a, g.sum(1, /*keepdim=*/true), 2.0);
    ga = t.to(st);
  }
  if (need_b) {
    at::Tensor t = at::mm(g.t(), a).mul_(-2.0);
    t.addcmul_(b, g.sum(0).unsqueeze(1), 2.0);
    gb = t.to(st);
  }
  return {ga, gb};
}

namespace {
constexpr int64_t kDChunk = 2048;

// z(key, d0 + k) of ot.h for k < len into out, with vecmath.h's branch-free -2 log and
// cos in place of libm's logf / cosf (which keep the loop scalar): the loop vectorises
// and is cloned for AVX2+FMA. Matches ot_normal to about 1e-7 relative.
FKD_CLONES
void ot_normals(uint32_t key, uint32_t d0, int64_t len, float* __restrict__ out) {
  for (int64_t k = 0; k < len; ++k) {
    float u1, u2, c, sn;
    ot_uniforms(key, d0 + static_cast<uint32_t>(k), u1, u2);
    sincos2pi(u2, c, sn);
    out[k] = sqrt_nn(neg2log(u1)) * c;
  }
}

constexpr int64_t kGenBlock = 512;

// Z[l, k] = z(seed, l, d0 + k) * scale[l] for k < len, in the compute type; adds
// sum_k z^2 (unscaled, in double) to sq[l] when sq is given.
template <typename ct>
void gen_dirs(ct* Z, int64_t L, int64_t d0, int64_t len, uint32_t seed, const double* scale,
              double* sq) {
  at::parallel_for(0, L, 1, [&](int64_t l0, int64_t l1) {
    alignas(64) float buf[kGenBlock];
    for (int64_t l = l0; l < l1; ++l) {
      const uint32_t key = ot_dir_key(seed, static_cast<uint32_t>(l));
      ct* z = Z + l * len;
      const ct sc = scale ? static_cast<ct>(scale[l]) : ct(1);
      double acc[4] = {0.0, 0.0, 0.0, 0.0};
      for (int64_t o = 0; o < len; o += kGenBlock) {
        const int64_t n = std::min<int64_t>(kGenBlock, len - o);
        ot_normals(key, static_cast<uint32_t>(d0 + o), n, buf);
        int64_t k = 0;
        for (; k + 4 <= n; k += 4)
          for (int j = 0; j < 4; ++j) acc[j] += static_cast<double>(buf[k + j]) * buf[k + j];
        for (; k < n; ++k) acc[0] += static_cast<double>(buf[k]) * buf[k];
        for (k = 0; k < n; ++k) z[o + k] = static_cast<ct>(static_cast<ct>(buf[k]) * sc);
      }
      if (sq) sq[l] += (acc[0] + acc[1]) + (acc[2] + acc[3]);
    }
  });
}
}  // namespace

std::tuple<at::Tensor, at::Tensor> sliced_project_cpu(const at::Tensor& x_in, int64_t L, int64_t seed) {
  TORCH_CHECK(x_in.dim() == 2, "sliced_project: x (N, D) expected");
  TORCH_CHECK(L > 0, "sliced_project: n_projections must be positive");
  TORCH_CHECK(x_in.device().is_cpu(), "sliced_project (cpp backend): CPU tensor expected");
  const auto ct = x_in.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const at::Tensor x = x_in.to(ct).contiguous();
  const int64_t N = x.size(0), D = x.size(1);
  at::Tensor proj = at::zeros({N, L}, x.options());
  std::vector<double> sq(L, 0.0);
  const uint32_t s32 = static_cast<uint32_t>(static_cast<uint64_t>(seed) & 0xffffffffULL);
  AT_DISPATCH_FLOATING_TYPES(ct, "sliced_project_cpu", [&] {
    at::Tensor Z = at::empty({L, std::min<int64_t>(D, kDChunk)}, x.options());
    for (int64_t d0 = 0; d0 < D; d0 += kDChunk) {  // only an (L, chunk) slab is ever stored
      const int64_t len = std::min<int64_t>(kDChunk, D - d0);
      at::Tensor Zc = Z.narrow(1, 0, len);
      if (len != Z.size(1)) Zc = Zc.contiguous();
      gen_dirs<scalar_t>(Zc.mutable_data_ptr<scalar_t>(), L, d0, len, s32, nullptr, sq.data());
      proj.addmm_(x.narrow(1, d0, len), Zc.t());
    }
  });
  at::Tensor inv = at::empty({L}, x.options().dtype(at::kDouble));
  double* ip = inv.mutable_data_ptr<double>();
  for (int64_t l = 0; l < L; ++l) ip[l] = 1.0 / std::sqrt(sq[l]);
  proj.mul_(inv.to(ct).unsqueeze(0));
  return {proj.to(x_in.scalar_type()), inv.to(ct)};
}

at::Tensor sliced_backproject_cpu(const at::Tensor& g_in, const at::Tensor& inv_norm, int64_t D,
                                  int64_t seed) {
  TORCH_CHECK(g_in.dim() == 2 && inv_norm.dim() == 1 && inv_norm.size(0) == g_in.size(1),
              "sliced_backproject: g (N, L) and inv_norm (L,) expected");
  TORCH_CHECK(g_in.device().is_cpu(), "sliced_backproject (cpp backend): CPU tensor expected");
  const auto ct = g_in.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const at::Tensor g = g_in.to(ct).contiguous();
  const int64_t N = g.size(0), L = g.size(1);
  const at::Tensor invd = inv_norm.to(at::kDouble).contiguous();
  at::Tensor out = at::empty({N, D}, g.options());
  const uint32_t s32 = static_cast<uint32_t>(static_cast<uint64_t>(seed) & 0xffffffffULL);
  AT_DISPATCH_FLOATING_TYPES(ct, "sliced_backproject_cpu", [&] {
    at::Tensor Z = at::empty({L, std::min<int64_t>(D, kDChunk)}, g.options());
    for (int64_t d0 = 0; d0 < D; d0 += kDChunk) {
      const int64_t len = std::min<int64_t>(kDChunk, D - d0);
      at::Tensor Zc = Z.narrow(1, 0, len);
      if (len != Z.size(1)) Zc = Zc.contiguous();
      gen_dirs<scalar_t>(Zc.mutable_data_ptr<scalar_t>(), L, d0, len, s32, invd.const_data_ptr<double>(), nullptr);
      out.narrow(1, d0, len).copy_(at::mm(g, Zc));
    }
  });
  return out.to(g_in.scalar_type());
}

// Minimum-cost perfect matching of a square cost matrix by shortest augmenting paths
// (Jonker-Volgenant form, O(n^3)), in double precision. Each free row grows one
// Dijkstra-like search over reduced costs c_ij - u_i - v_j: it scans only the columns not
// yet reached (a shrinking list, swap-removed), prefers a free column among equally cheap
// ones (the path can end there), and updates the duals of the rows and columns it reached
// once at the end, from their path lengths, rather than every column at every step.
at::Tensor linear_assignment_cpu(const at::Tensor& cost_in) {
  TORCH_CHECK(cost_in.dim() == 2 && cost_in.size(0) == cost_in.size(1),
              "linear_assignment: a square cost matrix is expected");
  TORCH_CHECK(cost_in.device().is_cpu(), "linear_assignment (cpp backend): CPU tensor expected");
  const at::Tensor cost = cost_in.to(at::kDouble).contiguous();
  const int64_t n = cost.size(0);
  const double* c = cost.const_data_ptr<double>();
  for (int64_t k = 0; k < n * n; ++k)
    TORCH_CHECK(std::isfinite(c[k]), "linear_assignment: cost must be finite (NaN or Inf found)");
  const double inf = std::numeric_limits<double>::infinity();
  std::vector<double> u(n, 0.0), v(n, 0.0), dist(n);
  std::vector<int64_t> row4col(n, -1), col4row(n, -1), pred(n), todo(n), rows_seen, cols_seen;
  rows_seen.reserve(n);
  cols_seen.reserve(n);
  for (int64_t start = 0; start < n; ++start) {
    std::fill(dist.begin(), dist.end(), inf);
    for (int64_t j = 0; j < n; ++j) todo[j] = j;
    int64_t left = n, i = start, sink = -1;
    double reach = 0.0;  // length of the shortest path found so far
    rows_seen.clear();
    cols_seen.clear();
    while (sink < 0) {
      rows_seen.push_back(i);
      const double* row = c + i * n;
      const double base = reach - u[i];
      double best = inf;
      int64_t at = -1;
      for (int64_t t = 0; t < left; ++t) {
        const int64_t j = todo[t];
        const double d = base + row[j] - v[j];
        if (d < dist[j]) { dist[j] = d; pred[j] = i; }
        if (dist[j] < best || (dist[j] == best && row4col[j] < 0)) { best = dist[j]; at = t; }
      }
      TORCH_CHECK(at >= 0, "linear_assignment: no augmenting path (non-finite reduced costs)");
      reach = best;
      const int64_t j = todo[at];
      cols_seen.push_back(j);
      todo[at] = todo[--left];
      if (row4col[j] < 0) sink = j;
      else i = row4col[j];
    }
    u[start] += reach;
    for (const int64_t r : rows_seen)
      if (r != start) u[r] += reach - dist[col4row[r]];
    for (const int64_t j : cols_seen) v[j] -= reach - dist[j];
    for (int64_t j = sink;;) {  // flip the path's edges
      const int64_t r = pred[j];
      row4col[j] = r;
      std::swap(col4row[r], j);
      if (r == start) break;
    }
  }
  at::Tensor out = at::empty({n}, cost.options().dtype(at::kLong));
  std::copy(col4row.begin(), col4row.end(), out.mutable_data_ptr<int64_t>());
  return out;
}

// Log-domain Sinkhorn with one eps per iteration (the schedule), uniform weights.
// f_i = -eps * log sum_j exp(log b_j + (g_j - C_ij) / eps), then the same for g.
// The potentials are float64 whatever C's dtype: they are about max(C), and the plan
// exp((f_i + g_j - C_ij) / eps) needs f_i + g_j - C_ij to much better than eps, which fp32
// potentials cannot hold once eps << max(C) (at blur 0.05 on 3072-pixel images the fp32
// rounding of f alone, divided by eps, is ~1e-2, and at blur 1e-4 the value became NaN).
// fp32 costs are read as they are and everything else is computed in double.
namespace {
constexpr int kLseLanes = 16;

// One row of the update: *mx = max_s v_s and *sum = sum_s exp(v_s - *mx), v_s = (y_s - k_s)
// * ie, all in double; fp32 costs are only read in fp32. (The fixed point amplifies the
// rounding of these sums by about max(C) / eps: with fp32 exponentials and sums, f_i + g_j
// was off by 2e-4 eps.) kLseLanes independent maxima and sums (a single accumulator is not
// reassociated, so it would stay scalar) and vecmath.h's exp instead of libm's: the loops
// vectorise in the AVX2+FMA clones below.
template <typename T>
FKD_INLINE void row_lse_body(const T* __restrict__ k, const double* __restrict__ y, int64_t S, double ie,
                             double* mx, double* sum) {
  double m[kLseLanes], a[kLseLanes];
  for (int j = 0; j < kLseLanes; ++j) { m[j] = -std::numeric_limits<double>::infinity(); a[j] = 0.0; }
  int64_t s = 0;
  for (; s + kLseLanes <= S; s += kLseLanes)
    for (int j = 0; j < kLseLanes; ++j) {
      const double v = (y[s + j] - static_cast<double>(k[s + j])) * ie;
      m[j] = v > m[j] ? v : m[j];
    }
  double mm = -std::numeric_limits<double>::infinity();
  for (int j = 0; j < kLseLanes; ++j) mm = m[j] > mm ? m[j] : mm;
  for (int64_t t = s; t < S; ++t) mm = std::max(mm, (y[t] - static_cast<double>(k[t])) * ie);
  for (s = 0; s + kLseLanes <= S; s += kLseLanes)
    for (int j = 0; j < kLseLanes; ++j) a[j] += exp_nonpos((y[s + j] - static_cast<double>(k[s + j])) * ie - mm);
  double acc = 0.0;
  for (int j = 0; j < kLseLanes; ++j) acc += a[j];
  for (; s < S; ++s) acc += exp_nonpos((y[s] - static_cast<double>(k[s])) * ie - mm);
  *mx = mm;
  *sum = acc;
}

FKD_CLONES
void row_lse(const float* k, const double* y, int64_t S, double ie, double* mx, double* sum) {
  row_lse_body(k, y, S, ie, mx, sum);
}

FKD_CLONES
void row_lse(const double* k, const double* y, int64_t S, double ie, double* mx, double* sum) {
  row_lse_body(k, y, S, ie, mx, sum);
}

template <typename T>
void sinkhorn_iterations(const T* cp, const T* ctp, double* fp, double* gp, int64_t N, int64_t M,
                         const double* ep, int64_t T_) {
  // x_i <- -eps * (logsumexp_j (y_j - K_ij) / eps + log w), w the uniform weight of the other side.
  auto update = [&](const T* K, const double* y, double* x, int64_t R, int64_t S, double eps) {
    const double ie = 1.0 / eps;
    const double logw = -std::log(static_cast<double>(S));
    at::parallel_for(0, R, 16, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        double mx, acc;
        row_lse(K + r * S, y, S, ie, &mx, &acc);
        x[r] = -eps * (mx + std::log(acc) + logw);
      }
    });
  };
  for (int64_t t = 0; t < T_; ++t) {
    update(cp, gp, fp, N, M, ep[t]);
    update(ctp, fp, gp, M, N, ep[t]);
  }
}
}  // namespace

std::tuple<at::Tensor, at::Tensor> sinkhorn_log_cpu(const at::Tensor& C_in, const at::Tensor& eps_sched) {
  TORCH_CHECK(C_in.dim() == 2, "sinkhorn_log: C (N, M) expected");
  TORCH_CHECK(C_in.device().is_cpu(), "sinkhorn_log (cpp backend): CPU tensor expected");
  const auto ct = C_in.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const at::Tensor C = C_in.to(ct).contiguous();
  const at::Tensor CT = C.t().contiguous();
  const int64_t N = C.size(0), M = C.size(1);
  const at::Tensor sched = eps_sched.to(at::kDouble).contiguous();
  const auto dopt = C.options().dtype(at::kDouble);
  at::Tensor f = at::zeros({N}, dopt), g = at::zeros({M}, dopt);
  double* fp = f.mutable_data_ptr<double>();
  double* gp = g.mutable_data_ptr<double>();
  if (ct == at::kFloat) {
    sinkhorn_iterations<float>(C.const_data_ptr<float>(), CT.const_data_ptr<float>(), fp, gp, N, M,
                               sched.const_data_ptr<double>(), sched.numel());
  } else {
    sinkhorn_iterations<double>(C.const_data_ptr<double>(), CT.const_data_ptr<double>(), fp, gp, N, M,
                                sched.const_data_ptr<double>(), sched.numel());
  }
  return {f, g};
}

}  // namespace fastkd

TORCH_LIBRARY_FRAGMENT(fastkd, m) {
  m.def("pairwise_sqdist_fwd(Tensor a, Tensor b) -> Tensor");
  m.def("pairwise_sqdist_bwd(Tensor grad, Tensor a, Tensor b, bool need_a, bool need_b) -> (Tensor, Tensor)");
  m.def("sliced_project(Tensor x, int n_projections, int seed) -> (Tensor, Tensor)");
  m.def("sliced_backproject(Tensor g, Tensor inv_norm, int D, int seed) -> Tensor");
  m.def("linear_assignment(Tensor cost) -> Tensor");
  m.def("sinkhorn_log(Tensor C, Tensor eps_schedule) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(fastkd, CPU, m) {
  m.impl("pairwise_sqdist_fwd", &fastkd::pairwise_sqdist_fwd_cpu);
  m.impl("pairwise_sqdist_bwd", &fastkd::pairwise_sqdist_bwd);
  m.impl("sliced_project", &fastkd::sliced_project_cpu);
  m.impl("sliced_backproject", &fastkd::sliced_backproject_cpu);
  m.impl("linear_assignment", &fastkd::linear_assignment_cpu);
  m.impl("sinkhorn_log", &fastkd::sinkhorn_log_cpu);
}
