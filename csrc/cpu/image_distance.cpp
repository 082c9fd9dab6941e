// Paired image distance on the CPU: loss and d loss / d a in one pass over a and b.
//
// Work is split into (sample, chunk) tiles run in parallel; each tile is a branch-free
// loop the compiler vectorises (16 partial sums in the op-math type), summing the tile in
// double. Per-tile partial sums are added in a fixed order: results are deterministic.
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <vector>

#include "fastkd.h"
#include "ot.h"

namespace fastkd {
namespace {

constexpr int64_t kChunk = 8192;
constexpr int kLanes = 16;

// |d|^P of element i (d = a - b); with GRAD also writes d loss / d a_i = s * d|d|^P/dd.
template <typename acc_t, typename scalar_t, int P, bool GRAD>
inline acc_t term(const scalar_t* __restrict__ a, const scalar_t* __restrict__ b, scalar_t* __restrict__ g,
                  int64_t i, acc_t s) {
  const acc_t d = static_cast<acc_t>(a[i]) - static_cast<acc_t>(b[i]);
  if constexpr (P == 1) {
    if constexpr (GRAD)
      g[i] = static_cast<scalar_t>(s * (static_cast<acc_t>(d > acc_t(0)) - static_cast<acc_t>(d < acc_t(0))));
    return std::abs(d);
  } else {
    if constexpr (GRAD) g[i] = static_cast<scalar_t>(s * acc_t(2) * d);
    return d * d;
  }
}

template <typename scalar_t, int P, bool GRAD>
void run(const scalar_t* __restrict__ a, const scalar_t* __restrict__ b, scalar_t* __restrict__ g,
         int64_t N, int64_t D, const std::vector<double>& gscale, std::vector<double>& part) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t nch = (D + kChunk - 1) / kChunk;
  at::parallel_for(0, N * nch, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t n = t / nch, c = t % nch;
      const int64_t lo = c * kChunk, hi = std::min(D, lo + kChunk);
      const scalar_t* __restrict__ ap = a + n * D;
      const scalar_t* __restrict__ bp = b + n * D;
      scalar_t* __restrict__ gp = GRAD ? g + n * D : nullptr;
      const acc_t s = static_cast<acc_t>(gscale[n]);
      // kLanes independent partial sums: the loop vectorises without reassociating a
      // single float accumulator (which the compiler may not do without fast-math).
      acc_t lanes[kLanes] = {};
      int64_t i = lo;
      for (; i + kLanes <= hi; i += kLanes)
        for (int k = 0; k < kLanes; ++k) lanes[k] += term<acc_t, scalar_t, P, GRAD>(ap, bp, gp, i + k, s);
      acc_t acc = acc_t(0);
      for (int k = 0; k < kLanes; ++k) acc += lanes[k];
      for (; i < hi; ++i) acc += term<acc_t, scalar_t, P, GRAD>(ap, bp, gp, i, s);
      part[t] = static_cast<double>(acc);
    }
  });
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> image_distance_fwd_cpu(const at::Tensor& a_in, const at::Tensor& b_in,
                                                          int64_t p, int64_t reduction, bool need_grad) {
  TORCH_CHECK(a_in.sizes() == b_in.sizes(), "image_distance: a and b must have the same shape");
  TORCH_CHECK(a_in.dim() >= 1 && a_in.size(0) > 0 && a_in.numel() > 0, "image_distance: empty input");
  TORCH_CHECK(a_in.scalar_type() == b_in.scalar_type(), "image_distance: a and b dtypes differ");
  TORCH_CHECK(at::isFloatingType(a_in.scalar_type()), "image_distance: a must be floating point");
  TORCH_CHECK(p == 1 || p == 2, "image_distance: p must be 1 or 2, got ", p);
  TORCH_CHECK(reduction >= 0 && reduction <= 2, "image_distance: bad reduction code ", reduction);
  TORCH_CHECK(a_in.device().is_cpu() && b_in.device().is_cpu(), "image_distance (cpp backend): CPU tensors expected");
  const at::Tensor a = a_in.contiguous(), b = b_in.contiguous();
  const int64_t N = a.size(0), D = a.numel() / N;
  const double per = p == 1 ? 1.0 / static_cast<double>(D) : 1.0;  // per-sample normalisation
  const double red = reduction == kMean ? 1.0 / static_cast<double>(N) : 1.0;
  std::vector<double> gscale(N, per * red);
  const int64_t nch = (D + kChunk - 1) / kChunk;
  std::vector<double> part(N * nch, 0.0);
  at::Tensor grad = need_grad ? at::empty_like(a, at::MemoryFormat::Contiguous) : at::empty({0}, a.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.scalar_type(), "image_distance_fwd_cpu", [&] {
    const scalar_t* ap = a.const_data_ptr<scalar_t>();
    const scalar_t* bp = b.const_data_ptr<scalar_t>();
    scalar_t* gp = need_grad ? grad.mutable_data_ptr<scalar_t>() : nullptr;
    if (p == 1) {
      need_grad ? run<scalar_t, 1, true>(ap, bp, gp, N, D, gscale, part)
                : run<scalar_t, 1, false>(ap, bp, gp, N, D, gscale, part);
    } else {
      need_grad ? run<scalar_t, 2, true>(ap, bp, gp, N, D, gscale, part)
                : run<scalar_t, 2, false>(ap, bp, gp, N, D, gscale, part);
    }
  });
  auto per_sample = at::empty({N}, a.options().dtype(at::kDouble));
  double* pp = per_sample.mutable_data_ptr<double>();
  double total = 0.0;
  for (int64_t n = 0; n < N; ++n) {
    double s = 0.0;
    for (int64_t c = 0; c < nch; ++c) s += part[n * nch + c];
    pp[n] = s * per;
    total += pp[n];
  }
  at::Tensor loss = reduction == kNone ? per_sample
                                       : at::scalar_tensor(total * red, a.options().dtype(at::kDouble));
  return {loss.to(a.scalar_type()), grad};
}

}  // namespace fastkd

TORCH_LIBRARY_FRAGMENT(fastkd, m) {
  m.def("image_distance_fwd(Tensor a, Tensor b, int p, int reduction, bool need_grad) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(fastkd, CPU, m) {
  m.impl("image_distance_fwd", &fastkd::image_distance_fwd_cpu);
}
