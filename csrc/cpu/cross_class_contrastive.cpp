// Cross-class contrastive loss on the CPU in O(N*K): the closed form of fastkd/ops/contrastive.py.
//
// Samples are segmented by group and, within a group, by class. With the group mean m_g
// subtracted (the loss is translation invariant inside a group), q_i = p_i - m_g,
// T_s = sum of q over segment s, U_g = sum of T_s over the group's segments:
//   L      = 2 sum_i (N_g - n_s) ||q_i||^2 - 2 sum_g ||U_g||^2 + 2 sum_s ||T_s||^2
//   dL/dp_i = 4 [(N_g - n_s) q_i - (U_g - T_s)]
// Centring makes every term but the (tiny) ||U_g||^2 non-negative, so nothing cancels;
// all sums are accumulated in double. The gradient is written in the forward pass.
#include <ATen/Parallel.h>

#include <algorithm>
#include <numeric>
#include <vector>

#include "cake_ops.h"

namespace fastkd {
namespace {

// Maps non-negative keys to dense ids 0..count-1 (order of first appearance); returns count.
int64_t densify(const int64_t* k, int64_t n, int64_t* ids) {
  int64_t kmax = 0;
  for (int64_t i = 0; i < n; ++i) kmax = std::max(kmax, k[i]);
  int64_t cnt = 0;
  if (kmax < 4 * n + 4096) {
    std::vector<int64_t> table(kmax + 1, -1);
    for (int64_t i = 0; i < n; ++i) {
      int64_t& t = table[k[i]];
      if (t < 0) t = cnt++;
      ids[i] = t;
    }
    return cnt;
  }
  std::vector<int64_t> order(n);
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return k[a] < k[b]; });
  for (int64_t r = 0; r < n; ++r) {
    if (r > 0 && k[order[r]] != k[order[r - 1]]) ++cnt;
    ids[order[r]] = cnt;
  }
  return n > 0 ? cnt + 1 : 0;
}

template <typename scalar_t>
double ccc_run(const at::Tensor& p, const int64_t* lab, const int64_t* grp, int64_t reduction,
               bool need_grad, at::Tensor& grad) {
  const int64_t N = p.size(0), K = p.size(1);
  const scalar_t* x = p.const_data_ptr<scalar_t>();
  std::vector<int64_t> gid(N, 0), lid(N), key(N), sid(N);
  const int64_t G = grp ? densify(grp, N, gid.data()) : 1;
  const int64_t L = densify(lab, N, lid.data());
  for (int64_t i = 0; i < N; ++i) key[i] = gid[i] * L + lid[i];
  const int64_t S = densify(key.data(), N, sid.data());

  std::vector<int64_t> ns(S, 0), ng(G, 0), sg(S, 0);
  for (int64_t i = 0; i < N; ++i) { ++ns[sid[i]]; ++ng[gid[i]]; sg[sid[i]] = gid[i]; }
  double pairs = 0.0;
  for (int64_t g = 0; g < G; ++g) pairs += static_cast<double>(ng[g]) * static_cast<double>(ng[g]);
  for (int64_t s = 0; s < S; ++s) pairs -= static_cast<double>(ns[s]) * static_cast<double>(ns[s]);
  if (pairs <= 0.0) {
    if (need_grad) grad.zero_();
    return 0.0;
  }
  const double scale = reduction == kMean ? 1.0 / pairs : 1.0;

  std::vector<double> mean(G * K, 0.0), T(S * K, 0.0), U(G * K, 0.0);
  for (int64_t i = 0; i < N; ++i) {
    double* m = mean.data() + gid[i] * K;
    const scalar_t* r = x + i * K;
    for (int64_t k = 0; k < K; ++k) m[k] += static_cast<double>(r[k]);
  }
  for (int64_t g = 0; g < G; ++g)
    for (int64_t k = 0; k < K; ++k) mean[g * K + k] /= static_cast<double>(ng[g]);
  for (int64_t i = 0; i < N; ++i) {
    double* t = T.data() + sid[i] * K;
    const double* m = mean.data() + gid[i] * K;
    const scalar_t* r = x + i * K;
    for (int64_t k = 0; k < K; ++k) t[k] += static_cast<double>(r[k]) - m[k];
  }
  double loss = 0.0;
  for (int64_t s = 0; s < S; ++s) {
    double* u = U.data() + sg[s] * K;
    const double* t = T.data() + s * K;
    double a = 0.0;
    for (int64_t k = 0; k < K; ++k) { u[k] += t[k]; a += t[k] * t[k]; }
    loss += 2.0 * a;
  }
  for (int64_t g = 0; g < G; ++g) {
    double a = 0.0;
    for (int64_t k = 0; k < K; ++k) a += U[g * K + k] * U[g * K + k];
    loss -= 2.0 * a;
  }
  scalar_t* go = need_grad ? grad.mutable_data_ptr<scalar_t>() : nullptr;
  // The row pass is a few flops per element: only large problems are worth a parallel region.
  const int64_t grain = std::max<int64_t>(1, 262144 / std::max<int64_t>(1, K));
  std::vector<double> rowpart(N, 0.0);
  at::parallel_for(0, N, grain, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) {
      const int64_t s = sid[i], g = gid[i];
      const double w = static_cast<double>(ng[g] - ns[s]);
      const double* m = mean.data() + g * K;
      const double* t = T.data() + s * K;
      const double* u = U.data() + g * K;
      const scalar_t* r = x + i * K;
      double a = 0.0;
      if (go) {
        scalar_t* o = go + i * K;
        for (int64_t k = 0; k < K; ++k) {
          const double q = static_cast<double>(r[k]) - m[k];
          a += q * q;
          o[k] = static_cast<scalar_t>(4.0 * scale * (w * q - (u[k] - t[k])));
        }
      } else {
        for (int64_t k = 0; k < K; ++k) {
          const double q = static_cast<double>(r[k]) - m[k];
          a += q * q;
        }
      }
      rowpart[i] = w * a;
    }
  });
  for (double v : rowpart) loss += 2.0 * v;
  return std::max(loss, 0.0) * scale;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> cross_class_contrastive_fwd_cpu(
    const at::Tensor& outputs, const at::Tensor& labels, const c10::optional<at::Tensor>& groups,
    int64_t reduction, bool need_grad) {
  TORCH_CHECK(outputs.dim() == 2, "cross_class_contrastive: outputs must be 2-D (N, K)");
  TORCH_CHECK(at::isFloatingType(outputs.scalar_type()), "cross_class_contrastive: outputs must be floating point");
  TORCH_CHECK(labels.scalar_type() == at::kLong && labels.dim() == 1 && labels.size(0) == outputs.size(0),
              "cross_class_contrastive: labels must be int64 of shape (N,)");
  TORCH_CHECK(reduction == kMean || reduction == kSum, "cross_class_contrastive: reduction must be mean or sum");
  TORCH_CHECK(outputs.device().is_cpu(), "cross_class_contrastive (cpp backend): outputs must be a CPU tensor");
  const at::Tensor p = outputs.contiguous();
  const at::Tensor lab = labels.contiguous();
  at::Tensor grp;
  if (groups.has_value()) {
    grp = groups->contiguous();
    TORCH_CHECK(grp.scalar_type() == at::kLong && grp.dim() == 1 && grp.size(0) == p.size(0),
                "cross_class_contrastive: groups must be int64 of shape (N,)");
  }
  at::Tensor grad = need_grad ? at::empty_like(p, at::MemoryFormat::Contiguous) : at::empty({0}, p.options());
  double loss = 0.0;
  if (p.size(0) > 0 && p.size(1) > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, p.scalar_type(), "ccc_fwd_cpu", [&] {
      loss = ccc_run<scalar_t>(p, lab.const_data_ptr<int64_t>(),
                               groups.has_value() ? grp.const_data_ptr<int64_t>() : nullptr,
                               reduction, need_grad, grad);
    });
  } else if (need_grad) {
    grad.zero_();
  }
  return {at::scalar_tensor(loss, p.options().dtype(at::kDouble)).to(p.scalar_type()), grad};
}

}  // namespace fastkd

TORCH_LIBRARY_FRAGMENT(fastkd, m) {
  m.def("cross_class_contrastive_fwd(Tensor outputs, Tensor labels, Tensor? groups, int reduction, "
        "bool need_grad) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(fastkd, CPU, m) {
  m.impl("cross_class_contrastive_fwd", &fastkd::cross_class_contrastive_fwd_cpu);
}
