#pragma once
// Host emulation of the CUDA features fastkd's kernels use (tests only; see README.md here).
//
// A launch runs its blocks one after another on blockDim host threads (std::thread), so the
// threads of a block run concurrently: __syncthreads is a real barrier over the block's
// live threads, __shared__ variables are one copy per kernel (blocks never overlap), warp
// collectives (__shfl*_sync, __ballot_sync, __any/__all_sync, __syncwarp) wait for every
// live lane named in the mask, and atomics are host atomics. Reading a lane that does not
// take part (outside the mask, exited, or past the end of a partial warp) yields poison:
// NaN for floating point, 0xdeadbeef... for integers. Launch configurations that CUDA
// rejects (empty grid or block, more than 1024 threads, grid.y/z > 65535, more than 48 KiB
// of dynamic shared memory) raise like C10_CUDA_KERNEL_LAUNCH_CHECK does. A thread that
// waits more than 20 s at a barrier aborts the process with a message (a deadlock).
//
// Test knobs: the environment variable FKD_EMU_SKIP_BARRIER=file.cu:LINE turns that
// __syncthreads into a no-op (to show that ThreadSanitizer catches the race);
// fkd_emu::fast_math_flag() = true makes logf err like the worst case of the approximate
// instruction (lg2.approx) that nvcc's --use_fast_math selects; fkd_emu::sm_count() is
// the multiprocessor count cudaDeviceGetAttribute reports (host code sizes grids by it).
#ifndef FASTKD_CUDA_EMU
#define FASTKD_CUDA_EMU 1
#endif

#include <ATen/ATen.h>  // before the macros below, which must not reach torch's headers
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <mutex>
#include <string>
#include <thread>
#include <tuple>
#include <type_traits>
#include <vector>

// ------------------------------------------------------------------ language keywords
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static  // blocks run one at a time: one copy per kernel is one per block

// The ops' CUDA registrations must not run in the emulation (the test library registers
// the same functions under its own namespace): the block becomes an unused function.
#undef TORCH_LIBRARY_IMPL
#define FKD_EMU_CAT2(a, b) a##b
#define FKD_EMU_CAT(a, b) FKD_EMU_CAT2(a, b)
#define TORCH_LIBRARY_IMPL(ns, k, m) \
  [[maybe_unused]] static void FKD_EMU_CAT(fkd_emu_unregistered_, __LINE__)(torch::Library & m)

struct uint3 {
  unsigned x, y, z;
};
struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
using cudaStream_t = void*;
using cudaError_t = int;
constexpr cudaError_t cudaSuccess = 0;
enum cudaDeviceAttr { cudaDevAttrMultiProcessorCount = 16 };

inline thread_local uint3 threadIdx{0, 0, 0};
inline thread_local uint3 blockIdx{0, 0, 0};
inline thread_local dim3 blockDim{1, 1, 1};
inline thread_local dim3 gridDim{1, 1, 1};

namespace fkd_emu {

inline std::atomic<int>& sm_count() {
  static std::atomic<int> n{4};
  return n;
}

[[noreturn]] inline void fatal(const char* what) {
  std::fprintf(stderr, "cuda emulation: %s\n", what);
  std::fflush(stderr);
  std::abort();
}

constexpr auto kDeadlock = std::chrono::seconds(20);

// State of the block being run; guarded by mu.
struct Block {
  std::mutex mu;
  std::condition_variable cv;
  int nthreads = 0;
  // __syncthreads
  int live = 0, arrived = 0;
  uint64_t bar_gen = 0;
  // warp collectives, per warp
  struct Warp {
    std::mutex mu;  // guards the fields below (a warp's collectives do not touch the block's mu)
    std::condition_variable cv;
    uint32_t exists = 0, live = 0;  // lanes of the block / not yet returned
    uint32_t arrived = 0, mask = 0;  // lanes waiting in the collective, union of their masks
    uint64_t gen = 0;
    int readers = 0;                 // lanes still to read the last exchange
    uint32_t valid = 0;              // lanes whose value the last exchange holds
    uint64_t in[32] = {}, out[32] = {};
  };
  std::vector<Warp> warps;
  std::vector<unsigned char> dyn;  // dynamic shared memory
};

inline thread_local Block* cur = nullptr;
inline thread_local int cur_tid = 0;

template <typename Pred>
inline void wait(std::unique_lock<std::mutex>& lk, std::condition_variable& cv, Pred pred, const char* what) {
  if (!cv.wait_for(lk, kDeadlock, pred)) fatal(what);
}

inline bool skip_barrier(const char* file, int line) {
  static const std::string want = [] {
    const char* e = std::getenv("FKD_EMU_SKIP_BARRIER");
    return std::string(e ? e : "");
  }();
  if (want.empty()) return false;
  std::string f(file);
  const auto slash = f.find_last_of('/');
  if (slash != std::string::npos) f = f.substr(slash + 1);
  return want == f + ":" + std::to_string(line);
}

inline void syncthreads(const char* file, int line) {
  if (skip_barrier(file, line)) return;
  Block& b = *cur;
  std::unique_lock<std::mutex> lk(b.mu);
  const uint64_t gen = b.bar_gen;
  if (++b.arrived == b.live) {
    b.arrived = 0;
    ++b.bar_gen;
    b.cv.notify_all();
    return;
  }
  wait(lk, b.cv, [&] { return b.bar_gen != gen; }, "deadlock in __syncthreads (a thread never reached it)");
}

// Warp exchange: every live lane of mask contributes v and gets all contributions; valid
// says whose. A lane whose collective is complete releases the others.
inline void release_if_complete(Block::Warp& w) {
  if (w.arrived == 0) return;
  const uint32_t need = w.mask & w.live;
  if ((w.arrived & need) != need) return;
  std::memcpy(w.out, w.in, sizeof(w.in));
  w.valid = w.arrived;
  w.readers = __builtin_popcount(w.arrived);
  w.arrived = 0;
  w.mask = 0;
  ++w.gen;
  w.cv.notify_all();
}

inline uint32_t exchange(uint32_t mask, uint64_t v, uint64_t* all) {
  Block& b = *cur;
  const int lane = cur_tid & 31;
  const uint32_t me = 1u << lane;
  if (!(mask & me)) fatal("warp collective called by a lane that is not in its mask");
  Block::Warp& w = b.warps[cur_tid >> 5];
  std::unique_lock<std::mutex> lk(w.mu);
  wait(lk, w.cv, [&] { return w.readers == 0; }, "deadlock in a warp collective");
  w.in[lane] = v;
  w.arrived |= me;
  w.mask |= mask;
  const uint64_t gen = w.gen;
  release_if_complete(w);
  wait(lk, w.cv, [&] { return w.gen != gen; }, "deadlock in a warp collective (a lane of the mask never reached it)");
  std::memcpy(all, w.out, sizeof(w.out));
  const uint32_t valid = w.valid;
  if (--w.readers == 0) w.cv.notify_all();
  return valid;
}

template <typename T>
inline T poison() {
  if constexpr (std::is_floating_point_v<T>) {
    return std::numeric_limits<T>::quiet_NaN();
  } else {
    const uint64_t bits = 0xdeadbeefdeadbeefULL;
    T t;
    std::memcpy(&t, &bits, sizeof(T));
    return t;
  }
}

template <typename T>
inline T shfl_from(uint32_t mask, T v, int src) {
  static_assert(sizeof(T) <= 8, "warp shuffles move at most 8 bytes");
  uint64_t bits = 0, all[32];
  std::memcpy(&bits, &v, sizeof(T));
  const uint32_t valid = exchange(mask, bits, all);
  if (src < 0 || src > 31 || !(valid & (1u << src))) return poison<T>();
  T out;
  std::memcpy(&out, &all[src], sizeof(T));
  return out;
}

inline uint32_t ballot(uint32_t mask, bool pred) {
  uint64_t all[32];
  const uint32_t valid = exchange(mask, pred ? 1u : 0u, all);
  uint32_t r = 0;
  for (int l = 0; l < 32; ++l)
    if ((valid & (1u << l)) && all[l]) r |= 1u << l;
  return r;
}

inline void thread_exit() {
  Block& b = *cur;
  {
    std::lock_guard<std::mutex> lk(b.mu);
    --b.live;
    if (b.arrived > 0 && b.arrived == b.live) {  // exited threads count as arrived
      b.arrived = 0;
      ++b.bar_gen;
      b.cv.notify_all();
    }
  }
  Block::Warp& w = b.warps[cur_tid >> 5];
  std::lock_guard<std::mutex> lk(w.mu);
  w.live &= ~(1u << (cur_tid & 31));
  release_if_complete(w);
}

template <typename T>
T* dynamic_smem() {
  return reinterpret_cast<T*>(cur->dyn.data());
}

inline void check_config(const dim3& g, const dim3& k, size_t smem) {
  const uint64_t threads = static_cast<uint64_t>(k.x) * k.y * k.z;
  const char* bad = nullptr;
  if (g.x == 0 || g.y == 0 || g.z == 0 || threads == 0) bad = "invalid configuration argument (empty grid or block)";
  else if (threads > 1024 || k.z > 64) bad = "invalid configuration argument (more than 1024 threads per block)";
  else if (g.x > 2147483647u || g.y > 65535u || g.z > 65535u) bad = "invalid configuration argument (grid too large)";
  else if (smem > 48 * 1024) bad = "invalid argument (more than 48 KiB of dynamic shared memory)";
  TORCH_CHECK(bad == nullptr, "CUDA error: ", bad, " (grid ", g.x, "x", g.y, "x", g.z, ", block ", k.x, "x", k.y,
              "x", k.z, ", ", smem, " B shared)");
}

// Runs body on g.x*g.y*g.z blocks of k threads. One host thread per CUDA thread, reused for
// every block; blocks run one after another.
template <typename F>
void run(dim3 g, dim3 k, size_t smem, const F& body) {
  static std::mutex one_launch_at_a_time;
  std::lock_guard<std::mutex> launch_lock(one_launch_at_a_time);
  check_config(g, k, smem);
  const int nt = static_cast<int>(k.x * k.y * k.z);
  const uint64_t nblocks = static_cast<uint64_t>(g.x) * g.y * g.z;
  Block b;
  b.nthreads = nt;
  b.warps = std::vector<Block::Warp>((nt + 31) / 32);
  b.dyn.resize(std::max<size_t>(smem, 16));
  // block-to-block barrier of the worker threads (not the kernel's)
  std::mutex pm;
  std::condition_variable pcv;
  int pdone = 0;
  uint64_t pgen = 0;
  auto reset = [&] {
    b.live = nt;
    b.arrived = 0;
    for (int w = 0; w < static_cast<int>(b.warps.size()); ++w) {
      const int n = std::min(32, nt - 32 * w);
      b.warps[w].exists = b.warps[w].live = n == 32 ? 0xffffffffu : ((1u << n) - 1u);
      b.warps[w].arrived = b.warps[w].mask = 0;
      b.warps[w].readers = 0;
    }
    std::memset(b.dyn.data(), 0xff, b.dyn.size());  // uninitialised shared memory reads as NaN
  };
  reset();
  auto worker = [&](int tid) {
    cur = &b;
    cur_tid = tid;
    blockDim = k;
    gridDim = g;
    threadIdx = uint3{tid % k.x, (tid / k.x) % k.y, tid / (k.x * k.y)};
    for (uint64_t blk = 0; blk < nblocks; ++blk) {
      blockIdx = uint3{static_cast<unsigned>(blk % g.x), static_cast<unsigned>((blk / g.x) % g.y),
                       static_cast<unsigned>(blk / (static_cast<uint64_t>(g.x) * g.y))};
      body();
      thread_exit();
      std::unique_lock<std::mutex> lk(pm);
      const uint64_t gen = pgen;
      if (++pdone == nt) {
        reset();  // every thread of the block has returned: nothing else touches b now
        pdone = 0;
        ++pgen;
        pcv.notify_all();
      } else if (!pcv.wait_for(lk, kDeadlock, [&] { return pgen != gen; })) {
        fatal("deadlock between blocks");
      }
    }
    cur = nullptr;
  };
  std::vector<std::thread> threads;
  threads.reserve(nt);
  for (int t = 0; t < nt; ++t) threads.emplace_back(worker, t);
  for (auto& t : threads) t.join();
}

template <typename... P>
struct Launch {
  dim3 g, k;
  size_t smem;
  void (*fn)(P...);
  template <typename... A>
  void operator()(A&&... a) const {
    static_assert(sizeof...(A) == sizeof...(P), "kernel launched with the wrong number of arguments");
    const std::tuple<std::decay_t<P>...> args(static_cast<P>(a)...);
    run(g, k, smem, [&] { std::apply(fn, args); });
  }
};

template <typename G, typename K, typename... P>
Launch<P...> launch(G g, K k, size_t smem, cudaStream_t, void (*fn)(P...)) {
  return Launch<P...>{dim3(g), dim3(k), smem, fn};
}

inline std::atomic<bool>& fast_math_flag() {
  static std::atomic<bool> on{false};
  return on;
}
inline bool fast_math() { return fast_math_flag().load(); }

// Atomic read-modify-write on plain memory (GCC builtins, which ThreadSanitizer understands).
template <typename T, typename Op>
T atomic_rmw(T* p, Op op) {
  static_assert(sizeof(T) == 4 || sizeof(T) == 8, "4- or 8-byte atomics only");
  using U = std::conditional_t<sizeof(T) == 4, uint32_t, uint64_t>;
  U* q = reinterpret_cast<U*>(p);
  U old = __atomic_load_n(q, __ATOMIC_RELAXED);
  for (;;) {
    T o;
    std::memcpy(&o, &old, sizeof(T));
    const T n = op(o);
    U nb;
    std::memcpy(&nb, &n, sizeof(T));
    if (__atomic_compare_exchange_n(q, &old, nb, false, __ATOMIC_ACQ_REL, __ATOMIC_RELAXED)) return o;
  }
}

}  // namespace fkd_emu

#define __syncthreads() ::fkd_emu::syncthreads(__FILE__, __LINE__)

// ------------------------------------------------------------------ warp collectives
template <typename T>
inline T __shfl_sync(unsigned mask, T v, int src, int width = 32) {
  const int lane = ::fkd_emu::cur_tid & 31;
  return ::fkd_emu::shfl_from(mask, v, (lane & ~(width - 1)) + (src & (width - 1)));
}
template <typename T>
inline T __shfl_down_sync(unsigned mask, T v, unsigned delta, int width = 32) {
  const int lane = ::fkd_emu::cur_tid & 31;
  const bool inside = (lane & (width - 1)) + static_cast<int>(delta) < width;
  const T got = ::fkd_emu::shfl_from(mask, v, inside ? lane + static_cast<int>(delta) : lane);
  return got;
}
template <typename T>
inline T __shfl_up_sync(unsigned mask, T v, unsigned delta, int width = 32) {
  const int lane = ::fkd_emu::cur_tid & 31;
  const bool inside = (lane & (width - 1)) >= static_cast<int>(delta);
  return ::fkd_emu::shfl_from(mask, v, inside ? lane - static_cast<int>(delta) : lane);
}
template <typename T>
inline T __shfl_xor_sync(unsigned mask, T v, int lane_mask, int width = 32) {
  const int lane = ::fkd_emu::cur_tid & 31;
  const int src = lane ^ lane_mask;
  const bool inside = (src & ~(width - 1)) == (lane & ~(width - 1));
  return ::fkd_emu::shfl_from(mask, v, inside ? src : lane);
}
inline unsigned __ballot_sync(unsigned mask, int pred) { return ::fkd_emu::ballot(mask, pred != 0); }
inline int __any_sync(unsigned mask, int pred) { return ::fkd_emu::ballot(mask, pred != 0) != 0; }
inline int __all_sync(unsigned mask, int pred) { return ::fkd_emu::ballot(mask, pred == 0) == 0; }
inline void __syncwarp(unsigned mask = 0xffffffffu) { (void)::fkd_emu::ballot(mask, true); }

// ------------------------------------------------------------------ atomics
template <typename T>
inline T atomicAdd(T* p, T v) {
  return ::fkd_emu::atomic_rmw(p, [v](T o) { return static_cast<T>(o + v); });
}
template <typename T>
inline T atomicMax(T* p, T v) {
  return ::fkd_emu::atomic_rmw(p, [v](T o) { return o < v ? v : o; });
}
template <typename T>
inline T atomicMin(T* p, T v) {
  return ::fkd_emu::atomic_rmw(p, [v](T o) { return v < o ? v : o; });
}
template <typename T>
inline T atomicExch(T* p, T v) {
  return ::fkd_emu::atomic_rmw(p, [v](T) { return v; });
}
template <typename T>
inline T atomicCAS(T* p, T cmp, T v) {
  return ::fkd_emu::atomic_rmw(p, [cmp, v](T o) { return o == cmp ? v : o; });
}

// ------------------------------------------------------------------ device functions
template <typename T>
inline T __ldg(const T* p) { return *p; }
inline int min(int a, int b) { return a < b ? a : b; }
inline int max(int a, int b) { return a < b ? b : a; }
inline unsigned min(unsigned a, unsigned b) { return a < b ? a : b; }
inline unsigned max(unsigned a, unsigned b) { return a < b ? b : a; }
inline long long min(long long a, long long b) { return a < b ? a : b; }
inline long long max(long long a, long long b) { return a < b ? b : a; }
inline long min(long a, long b) { return a < b ? a : b; }
inline long max(long a, long b) { return a < b ? b : a; }

namespace fkd_emu {
// With fast_math_flag(): lg2.approx.f32 has an absolute error of up to 2^-22.6 near 1;
// the emulation takes the worst case upwards, which is what can make log(a) > 0 for a < 1.
inline float logf_(float x) {
  const float r = std::log(x);
  return fast_math() ? r + 0.69314718f * 1.5e-7f : r;
}
}  // namespace fkd_emu
#define logf(x) ::fkd_emu::logf_(x)
inline float rsqrtf(float x) { return 1.0f / std::sqrt(x); }
inline double rsqrt(double x) { return 1.0 / std::sqrt(x); }
inline void sincospif(float x, float* s, float* c) {
  // correctly rounded sin(pi x), cos(pi x) (CUDA's sincospif: 1 ulp, also under fast math)
  const double a = static_cast<double>(x);
  *s = static_cast<float>(std::sin(M_PI * a));
  *c = static_cast<float>(std::cos(M_PI * a));
}
inline float cospif(float x) { return static_cast<float>(std::cos(M_PI * static_cast<double>(x))); }
inline float sinpif(float x) { return static_cast<float>(std::sin(M_PI * static_cast<double>(x))); }

inline cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr, int) {
  *value = ::fkd_emu::sm_count().load();
  return cudaSuccess;
}
