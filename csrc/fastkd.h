#pragma once
// Kept light (ATen + torch/library.h, no Python or C++-frontend headers) so that kernels,
// CUDA ones in particular, compile quickly.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <cstdint>
#include <tuple>

namespace fastkd {

// Reduction codes shared with fastkd/ops (0 = none, 1 = mean, 2 = sum).
enum Reduction : int64_t { kNone = 0, kMean = 1, kSum = 2 };

// Total variation: returns (loss, grad). grad is d loss / d x (for reduction "none":
// of each sample's own value) when need_grad, else an empty tensor.
std::tuple<at::Tensor, at::Tensor> tv_loss_fwd_cpu(const at::Tensor& x, int64_t p, bool diagonal,
                                                   int64_t reduction, bool need_grad);
std::tuple<at::Tensor, at::Tensor> tv_loss_fwd_cuda(const at::Tensor& x, int64_t p, bool diagonal,
                                                    int64_t reduction, bool need_grad);

// Number of difference terms of one (H, W) plane.
inline int64_t tv_terms_per_plane(int64_t H, int64_t W, bool diagonal) {
  int64_t n = (H - 1) * W + H * (W - 1);
  if (diagonal) n += 2 * (H - 1) * (W - 1);
  return n;
}

inline void tv_check(const at::Tensor& x, int64_t p, int64_t reduction) {
  TORCH_CHECK(x.dim() == 4, "tv_loss: x must be 4-D (N, C, H, W), got ", x.dim(), "-D");
  TORCH_CHECK(at::isFloatingType(x.scalar_type()), "tv_loss: x must be floating point, got ",
              x.scalar_type());
  TORCH_CHECK(x.size(2) >= 2 || x.size(3) >= 2, "tv_loss: x needs H >= 2 or W >= 2");
  TORCH_CHECK(p == 1 || p == 2, "tv_loss: p must be 1 or 2, got ", p);
  TORCH_CHECK(reduction >= 0 && reduction <= 2, "tv_loss: bad reduction code ", reduction);
}

}  // namespace fastkd
