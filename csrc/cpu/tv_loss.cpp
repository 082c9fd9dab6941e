// Total variation on the CPU: forward and gradient in one pass over x.
//
// Work is split into (N*C) image planes run in parallel. Each plane is walked row by
// row; every difference term is evaluated by short branch-free loops over the row so
// that the compiler vectorises them. Loss terms are accumulated per column (acc[w])
// and summed in double at the end of the plane, which keeps the reduction
// vectorisable and accurate.
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "fastkd.h"

namespace fastkd {
namespace {

template <typename T, int P>
inline T tv_f(T d) {
  if constexpr (P == 1) return std::abs(d); else return d * d;
}
template <typename T, int P>
inline T tv_g(T d) {  // derivative of tv_f; sign(0) = 0 like autograd of abs
  if constexpr (P == 1) return static_cast<T>(d > T(0)) - static_cast<T>(d < T(0));
  else return T(2) * d;
}

// Row buffers hold the derivative of each difference term, indexed by the term's origin
// column and padded with a zero on both sides (index -1 and W), so that every loop runs
// over the full row without boundary branches. The derivative of each term is computed
// once: vertical and diagonal terms are reused one row later for their end pixel.
template <typename acc_t>
struct TVRows {
  std::vector<acc_t> store;
  acc_t *th, *vc, *vp, *d1c, *d1p, *d2c, *d2p;
  explicit TVRows(int64_t W) : store(7 * (W + 2), acc_t(0)) {
    acc_t* b = store.data() + 1;
    th = b; vc = b + (W + 2); vp = b + 2 * (W + 2); d1c = b + 3 * (W + 2);
    d1p = b + 4 * (W + 2); d2c = b + 5 * (W + 2); d2p = b + 6 * (W + 2);
  }
  void reset() { std::fill(store.begin(), store.end(), acc_t(0)); }
};

template <typename scalar_t, typename acc_t, int P, bool DIAG, bool GRAD>
void tv_plane(const scalar_t* __restrict__ xin, scalar_t* __restrict__ gout, int64_t H, int64_t W,
              acc_t scale, acc_t* __restrict__ xbuf, TVRows<acc_t>& rows,
              acc_t* __restrict__ acc, double* loss_out) {
  const acc_t* x;
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    x = xin;
  } else {
    for (int64_t i = 0; i < H * W; ++i) xbuf[i] = static_cast<acc_t>(xin[i]);
    x = xbuf;
  }
  for (int64_t w = 0; w < W; ++w) acc[w] = acc_t(0);
  if constexpr (GRAD) rows.reset();
  for (int64_t h = 0; h < H; ++h) {
    const acc_t* __restrict__ r = x + h * W;
    const bool has_dn = h + 1 < H;
    const acc_t* __restrict__ dn = r + W;
    acc_t* __restrict__ th = rows.th;
    acc_t* __restrict__ vc = rows.vc;
    acc_t* __restrict__ d1 = rows.d1c;
    acc_t* __restrict__ d2 = rows.d2c;
    for (int64_t w = 0; w + 1 < W; ++w) {  // (h, w) -> (h, w + 1)
      const acc_t d = r[w + 1] - r[w];
      acc[w] += tv_f<acc_t, P>(d);
      if constexpr (GRAD) th[w] = tv_g<acc_t, P>(d);
    }
    if (has_dn) {
      for (int64_t w = 0; w < W; ++w) {  // (h, w) -> (h + 1, w)
        const acc_t d = dn[w] - r[w];
        acc[w] += tv_f<acc_t, P>(d);
        if constexpr (GRAD) vc[w] = tv_g<acc_t, P>(d);
      }
      if constexpr (DIAG) {
        for (int64_t w = 0; w + 1 < W; ++w) {  // (h, w) -> (h + 1, w + 1)
          const acc_t d = dn[w + 1] - r[w];
          acc[w] += tv_f<acc_t, P>(d);
          if constexpr (GRAD) d1[w] = tv_g<acc_t, P>(d);
        }
        for (int64_t w = 1; w < W; ++w) {  // (h, w) -> (h + 1, w - 1)
          const acc_t d = dn[w - 1] - r[w];
          acc[w] += tv_f<acc_t, P>(d);
          if constexpr (GRAD) d2[w] = tv_g<acc_t, P>(d);
        }
      }
    } else if constexpr (GRAD) {
      for (int64_t w = 0; w < W; ++w) vc[w] = acc_t(0);
      if constexpr (DIAG)
        for (int64_t w = 0; w < W; ++w) { d1[w] = acc_t(0); d2[w] = acc_t(0); }
    }
    if constexpr (GRAD) {
      const acc_t* __restrict__ vp = rows.vp;
      const acc_t* __restrict__ d1p = rows.d1p;
      const acc_t* __restrict__ d2p = rows.d2p;
      scalar_t* __restrict__ go = gout + h * W;
      for (int64_t w = 0; w < W; ++w) {
        acc_t g = (th[w - 1] - th[w]) + (vp[w] - vc[w]);
        if constexpr (DIAG) g += (d1p[w - 1] - d1[w]) + (d2p[w + 1] - d2[w]);
        go[w] = static_cast<scalar_t>(g * scale);
      }
      std::swap(rows.vc, rows.vp);
      if constexpr (DIAG) { std::swap(rows.d1c, rows.d1p); std::swap(rows.d2c, rows.d2p); }
    }
  }
  double s = 0.0;
  for (int64_t w = 0; w < W; ++w) s += static_cast<double>(acc[w]);
  *loss_out = s;
}

template <typename scalar_t, int P, bool DIAG, bool GRAD>
void tv_run(const at::Tensor& x, at::Tensor& grad, std::vector<double>& plane_loss, double scale) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t planes = x.size(0) * x.size(1), H = x.size(2), W = x.size(3);
  const scalar_t* xp = x.const_data_ptr<scalar_t>();
  scalar_t* gp = GRAD ? grad.mutable_data_ptr<scalar_t>() : nullptr;
  // A few planes per task keep the scheduling overhead small for tiny images.
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(1, H * W));
  at::parallel_for(0, planes, grain, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> xbuf(std::is_same_v<scalar_t, acc_t> ? 0 : H * W);
    std::vector<acc_t> acc(W);
    TVRows<acc_t> rows(W);
    for (int64_t i = begin; i < end; ++i) {
      tv_plane<scalar_t, acc_t, P, DIAG, GRAD>(xp + i * H * W, GRAD ? gp + i * H * W : nullptr, H, W,
                                               static_cast<acc_t>(scale), xbuf.data(), rows,
                                               acc.data(), &plane_loss[i]);
    }
  });
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> tv_loss_fwd_cpu(const at::Tensor& x_in, int64_t p, bool diagonal,
                                                   int64_t reduction, bool need_grad) {
  tv_check(x_in, p, reduction);
  TORCH_CHECK(x_in.device().is_cpu(), "tv_loss (cpp backend): x must be a CPU tensor");
  const at::Tensor x = x_in.contiguous();
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  const int64_t terms = N * tv_terms_per_plane(H, W, diagonal) * C;
  const double scale = (reduction == kMean && terms > 0) ? 1.0 / static_cast<double>(terms) : 1.0;
  at::Tensor grad = need_grad ? at::empty_like(x, at::MemoryFormat::Contiguous) : at::empty({0}, x.options());
  std::vector<double> plane_loss(N * C, 0.0);

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "tv_loss_fwd_cpu", [&] {
    auto run = [&](auto p_c, auto diag_c, auto grad_c) {
      tv_run<scalar_t, decltype(p_c)::value, decltype(diag_c)::value, decltype(grad_c)::value>(
          x, grad, plane_loss, scale);
    };
    using T = std::true_type;
    using F = std::false_type;
    using P1 = std::integral_constant<int, 1>;
    using P2 = std::integral_constant<int, 2>;
    if (p == 1) {
      if (diagonal) { need_grad ? run(P1{}, T{}, T{}) : run(P1{}, T{}, F{}); }
      else          { need_grad ? run(P1{}, F{}, T{}) : run(P1{}, F{}, F{}); }
    } else {
      if (diagonal) { need_grad ? run(P2{}, T{}, T{}) : run(P2{}, T{}, F{}); }
      else          { need_grad ? run(P2{}, F{}, T{}) : run(P2{}, F{}, F{}); }
    }
  });

  at::Tensor loss;
  if (reduction == kNone) {
    auto per = at::empty({N}, x.options().dtype(at::kDouble));
    double* pp = per.mutable_data_ptr<double>();
    for (int64_t n = 0; n < N; ++n) {
      double s = 0.0;
      for (int64_t c = 0; c < C; ++c) s += plane_loss[n * C + c];
      pp[n] = s;
    }
    loss = per.to(x.scalar_type());
  } else {
    double s = 0.0;
    for (double v : plane_loss) s += v;
    loss = at::scalar_tensor(s * scale, x.options().dtype(at::kDouble)).to(x.scalar_type());
  }
  return {loss, grad};
}

}  // namespace fastkd

TORCH_LIBRARY_FRAGMENT(fastkd, m) {
  m.def("tv_loss_fwd(Tensor x, int p, bool diagonal, int reduction, bool need_grad) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(fastkd, CPU, m) {
  m.impl("tv_loss_fwd", &fastkd::tv_loss_fwd_cpu);
}
