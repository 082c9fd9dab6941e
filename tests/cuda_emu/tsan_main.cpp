// Every kernel of csrc/cuda once, in the host emulation, under ThreadSanitizer (built by
// build.py with -fsanitize=thread). Values are checked by the Python tests; this program
// only has to run the kernels' memory accesses so that TSan sees them, and it exits
// non-zero (66) when TSan reports a race. Argument: the kernel to run ("all" by default).
#include "emu_ops.cpp"

#include <ATen/Parallel.h>

#include <cstring>
#include <iostream>

namespace {

bool want(const char* which, const char* name) { return !std::strcmp(which, "all") || !std::strcmp(which, name); }

}  // namespace

int main(int argc, char** argv) {
  const char* which = argc > 1 ? argv[1] : "all";
  at::set_num_threads(1);
  fkd_emu::sm_count() = 2;
  at::manual_seed(0);
  const auto f64 = at::TensorOptions().dtype(at::kDouble);
  const auto f32 = at::TensorOptions().dtype(at::kFloat);
  if (want(which, "tv_loss")) {
    // 2 x 3 x 17 x 33 = 1683 per sample: several blocks per sample, the last one partial
    auto x = at::randn({2, 3, 17, 33}, f64);
    fastkd::tv_loss_fwd_cuda(x, 1, true, fastkd::kMean, true);
    fastkd::tv_loss_fwd_cuda(x.to(at::kHalf), 2, false, fastkd::kNone, true);
  }
  if (want(which, "image_distance")) {
    auto a = at::randn({3, 1500}, f32), b = at::randn({3, 1500}, f32);
    fastkd::image_distance_fwd_cuda(a, b, 1, fastkd::kMean, true);
  }
  if (want(which, "bn_stats")) {
    auto x = at::randn({5, 2, 31, 33}, f32);  // two chunks per channel
    auto rm = at::zeros({2}, f32), rv = at::ones({2}, f32);
    auto [loss, mean, var, norms] = fastkd::bn_stats_fwd_cuda(x, rm, rv);
    fastkd::bn_stats_bwd_cuda(at::ones({}, f32), x, mean, var, rm, rv, norms);
  }
  if (want(which, "contrastive")) {
    auto p = at::randn({70, 5}, f32);
    auto labels = at::randint(0, 4, {70}, at::TensorOptions().dtype(at::kLong));
    auto groups = at::randint(0, 3, {70}, at::TensorOptions().dtype(at::kLong));
    fastkd::cross_class_contrastive_fwd_cuda(p, labels, groups, fastkd::kMean, true);
  }
  if (want(which, "langevin")) {
    auto x = at::randn({2, 2, 9, 300}, f32), g = at::randn({2, 2, 9, 300}, f32);
    fastkd::langevin_step_cuda(x, g, c10::nullopt, 0.1, c10::nullopt, 0.05, true, -1.0, 1.0, 0.5, 1, 7);
    auto y = at::randn({3, 1001}, f32), gy = at::randn({3, 1001}, f32);
    fastkd::langevin_step_cuda(y, gy, c10::nullopt, 0.1, c10::nullopt, 0.05, false, 0.0, 0.0, 0.0, 1, 7);
  }
  if (want(which, "ot")) {
    auto a = at::randn({5, 40}, f32), b = at::randn({3, 40}, f32);
    fastkd::pairwise_sqdist_fwd_cuda(a, a.index({at::indexing::Slice(0, 3)}) + 1e-4);
    fastkd::pairwise_sqdist_fwd_cuda(a, b);
    auto [proj, inv] = fastkd::sliced_project_cuda(at::randn({9, 300}, f32), 8, 3);  // two row tiles
    fastkd::sliced_backproject_cuda(at::randn({9, 8}, f32), inv, 300, 3);
  }
  std::cout << "ran " << which << "\n";
  return 0;
}
