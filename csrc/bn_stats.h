#pragma once
// BatchNorm-statistics loss (fastkd.ops.bn_stats_loss): shared declarations and checks.
#include "fastkd.h"

#include <tuple>

namespace fastkd {

// Forward: (loss, mean, var, norms) where mean / var are the per-channel batch mean and
// biased variance (in the accumulation dtype: fp32 for fp16/bf16 x) and
// norms = (||mean - running_mean||, ||var - running_var||).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> bn_stats_fwd_cpu(
    const at::Tensor& x, const at::Tensor& running_mean, const at::Tensor& running_var);
at::Tensor bn_stats_bwd_cpu(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& mean,
                            const at::Tensor& var, const at::Tensor& running_mean,
                            const at::Tensor& running_var, const at::Tensor& norms);
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> bn_stats_fwd_cuda(
    const at::Tensor& x, const at::Tensor& running_mean, const at::Tensor& running_var);
at::Tensor bn_stats_bwd_cuda(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& mean,
                             const at::Tensor& var, const at::Tensor& running_mean,
                             const at::Tensor& running_var, const at::Tensor& norms);

inline at::ScalarType bn_acc_type(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

inline void bn_stats_check(const at::Tensor& x, const at::Tensor& rm, const at::Tensor& rv) {
  TORCH_CHECK(x.dim() == 2 || x.dim() == 4, "bn_stats_loss: x must be (N, C) or (N, C, H, W), got ",
              x.dim(), "-D");
  TORCH_CHECK(at::isFloatingType(x.scalar_type()), "bn_stats_loss: x must be floating point, got ",
              x.scalar_type());
  TORCH_CHECK(x.numel() > 0, "bn_stats_loss: x must not be empty");
  const auto acc = bn_acc_type(x.scalar_type());
  TORCH_CHECK(rm.dim() == 1 && rm.size(0) == x.size(1), "bn_stats_loss: running_mean must have shape (",
              x.size(1), ",)");
  TORCH_CHECK(rv.dim() == 1 && rv.size(0) == x.size(1), "bn_stats_loss: running_var must have shape (",
              x.size(1), ",)");
  TORCH_CHECK(rm.scalar_type() == acc && rv.scalar_type() == acc,
              "bn_stats_loss: running statistics must be ", acc, " for x of dtype ", x.scalar_type());
}

// Elements per (sample, channel) plane.
inline int64_t bn_plane_size(const at::Tensor& x) {
  return x.dim() == 4 ? x.size(2) * x.size(3) : 1;
}

}  // namespace fastkd
