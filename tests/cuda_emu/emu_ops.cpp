// fastkd's CUDA sources (csrc/cuda/*.cu, kernels and host code) built for the host
// emulation of include/cuda_runtime.h, as the ops fastkd_emu::<op> (same schemas as
// fastkd::<op>) on CPU tensors. Test-only: built by build.py, never installed.
#include <cuda_runtime.h>  // the emulation (tests/cuda_emu/include), before any kernel source

#include "cuda/bn_stats.cu"
#include "cuda/cross_class_contrastive.cu"
#include "cuda/image_distance.cu"
#include "cuda/langevin.cu"
#include "cuda/ot.cu"
#include "cuda/tv_loss.cu"

// Small kernels that pin down the emulation's own semantics (emu_semantics.py).
namespace probe {

__global__ void shfl_down(double* out, int delta, int exit_from) {
  const int t = threadIdx.x;
  if (t >= exit_from) return;  // these threads have exited: reading their lanes is undefined
  out[t] = __shfl_down_sync(0xffffffffu, static_cast<float>(t), delta);
}

__global__ void shfl_xor_idx(double* out, int lane_mask) {
  const int t = threadIdx.x;
  out[t] = __shfl_xor_sync(0xffffffffu, t, lane_mask);
}

__global__ void shfl_masked(double* out, int src) {
  const int t = threadIdx.x;
  if (t & 1) return;  // only even lanes take part, and only they are in the mask
  out[t] = __shfl_sync(0x55555555u, static_cast<double>(t), src);
}

__global__ void ballot_odd(double* out, int) {
  out[threadIdx.x] = static_cast<double>(__ballot_sync(0xffffffffu, threadIdx.x & 1));
}

// every thread adds 1 to out[0] (float) and out[1] (double): exact with correct atomics
__global__ void atomics(double* out, int) {
  atomicAdd(reinterpret_cast<float*>(out + 2), 1.0f);
  atomicAdd(out + 1, 1.0);
}

// shared memory seen across the block after the barrier, with some threads exited early
__global__ void barrier(double* out, int exit_below) {
  __shared__ double s[1024];
  const int t = threadIdx.x;
  s[t] = -1.0;
  if (t < exit_below) return;
  s[t] = t;
  __syncthreads();
  out[t] = s[(t + 1) % blockDim.x];
}

}  // namespace probe

namespace {
at::Tensor run_probe(const std::string& name, int64_t threads, int64_t blocks, int64_t arg) {
  at::Tensor out = at::full({std::max<int64_t>(threads, 3)}, -7.0, at::TensorOptions().dtype(at::kDouble));
  if (name == "atomics") out.zero_();
  double* p = out.mutable_data_ptr<double>();
  const int a = static_cast<int>(arg);
  const dim3 grid(static_cast<unsigned>(blocks)), block(static_cast<unsigned>(threads));
  if (name == "shfl_down") FKD_LAUNCH(grid, block, 0, nullptr, probe::shfl_down)(p, a, 1 << 30);
  else if (name == "shfl_down_exited") FKD_LAUNCH(grid, block, 0, nullptr, probe::shfl_down)(p, 1, a);
  else if (name == "shfl_xor") FKD_LAUNCH(grid, block, 0, nullptr, probe::shfl_xor_idx)(p, a);
  else if (name == "shfl_masked") FKD_LAUNCH(grid, block, 0, nullptr, probe::shfl_masked)(p, a);
  else if (name == "ballot") FKD_LAUNCH(grid, block, 0, nullptr, probe::ballot_odd)(p, a);
  else if (name == "atomics") FKD_LAUNCH(grid, block, 0, nullptr, probe::atomics)(p, a);
  else if (name == "barrier") FKD_LAUNCH(grid, block, 0, nullptr, probe::barrier)(p, a);
  else TORCH_CHECK(false, "unknown probe ", name);
  return out;
}

void set_sm_count(int64_t n) { fkd_emu::sm_count() = static_cast<int>(n); }
void set_fast_math(bool on) { fkd_emu::fast_math_flag() = on; }
}  // namespace

TORCH_LIBRARY(fastkd_emu, m) {
  m.def("set_sm_count(int n) -> ()", &set_sm_count);
  m.def("set_fast_math(bool on) -> ()", &set_fast_math);
  m.def("probe(str name, int threads, int blocks, int arg) -> Tensor", &run_probe);
  m.def("tv_loss_fwd(Tensor x, int p, bool diagonal, int reduction, bool need_grad) -> (Tensor, Tensor)",
        &fastkd::tv_loss_fwd_cuda);
  m.def("image_distance_fwd(Tensor a, Tensor b, int p, int reduction, bool need_grad) -> (Tensor, Tensor)",
        &fastkd::image_distance_fwd_cuda);
  m.def("bn_stats_fwd(Tensor x, Tensor running_mean, Tensor running_var) -> (Tensor, Tensor, Tensor, Tensor)",
        &fastkd::bn_stats_fwd_cuda);
  m.def("bn_stats_bwd(Tensor grad, Tensor x, Tensor mean, Tensor var, Tensor running_mean, "
        "Tensor running_var, Tensor norms) -> Tensor",
        &fastkd::bn_stats_bwd_cuda);
  m.def("cross_class_contrastive_fwd(Tensor outputs, Tensor labels, Tensor? groups, int reduction, "
        "bool need_grad) -> (Tensor, Tensor)",
        &fastkd::cross_class_contrastive_fwd_cuda);
  m.def("langevin_step_(Tensor(a!) x, Tensor grad, Tensor? lr_t, float lr, Tensor? std_t, float noise_std, "
        "bool do_clamp, float lo, float hi, float tv_weight, int tv_p, int seed) -> ()",
        &fastkd::langevin_step_cuda);
  m.def("pairwise_sqdist_fwd(Tensor a, Tensor b) -> Tensor", &fastkd::pairwise_sqdist_fwd_cuda);
  m.def("sliced_project(Tensor x, int n_projections, int seed) -> (Tensor, Tensor)", &fastkd::sliced_project_cuda);
  m.def("sliced_backproject(Tensor g, Tensor inv_norm, int D, int seed) -> Tensor",
        &fastkd::sliced_backproject_cuda);
}
