// What the CPU kernels share: 16-float vectors (GCC/Clang vector extensions, so the compiler picks
// the host's instructions), an exp for non-positive arguments, and a parallel loop over XLA's
// intra-op threads.
#ifndef JAXSPEC_CPU_KERNELS_VEC_H_
#define JAXSPEC_CPU_KERNELS_VEC_H_

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <memory>
#include <thread>

#include "xla/ffi/api/ffi.h"

namespace cpu_kernels {

typedef float vf __attribute__((vector_size(64)));
typedef int32_t vi __attribute__((vector_size(64)));
constexpr int kLanes = 16;

inline vf load(const float* p) {
  vf v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
inline void store(float* p, vf v) { std::memcpy(p, &v, sizeof v); }
inline vf splat(float a) { return vf{} + a; }

// rows[16] of 16 lanes transposed in place: four rounds swapping off-diagonal blocks of 8, 4, 2, 1.
inline void transpose16(vf rows[kLanes]) {
  for (int b = kLanes / 2; b > 0; b /= 2) {
    vi lo, hi;
    for (int l = 0; l < kLanes; ++l) {
      lo[l] = (l & b) == 0 ? l : kLanes + l - b;
      hi[l] = (l & b) == 0 ? l + b : kLanes + l;
    }
    for (int i = 0; i < kLanes; ++i) {
      if (i & b) continue;
      const vf a = rows[i], c = rows[i + b];
      rows[i] = __builtin_shuffle(a, c, lo);
      rows[i + b] = __builtin_shuffle(a, c, hi);
    }
  }
}

// exp(x) for x <= 0: 2^n * p(r), r = x - n ln2 in [-ln2/2, ln2/2], p of degree 6 (Cephes' expf
// coefficients; relative error about 2e-7); 0 below -87, where exp is under the smallest normal float.
inline vf exp_nonpositive(vf x) {
  const vf zero = {};
  const vf under = x < -87.0f ? splat(1.0f) : zero;
  x = x < -87.0f ? splat(-87.0f) : x;
  const vf shifter = splat(12582912.0f);  // 1.5 * 2^23: adding it rounds to an integer
  vf n = x * 1.44269504088896341f + shifter;
  n = n - shifter;
  vf r = x - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  vf p = splat(1.9875691500e-4f);
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const vi bits = (__builtin_convertvector(n, vi) + 127) << 23;
  vf scale;
  std::memcpy(&scale, &bits, sizeof scale);
  const vf e = p * scale;
  return under != 0.0f ? zero : e;
}

// fn(i) for i < n on this thread and up to `helpers` tasks on XLA's pool. This thread claims items
// too and waits only for items already claimed, never for a task to start.
struct LoopCounters {
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> done{0};
};

template <typename Fn>
void parallel_for(xla::ffi::ThreadPool& pool, int64_t n, int64_t helpers, const Fn& fn) {
  auto counters = std::make_shared<LoopCounters>();
  // A task that starts after the loop is over finds no item and never touches fn.
  auto run = [counters, n, &fn]() {
    for (int64_t i; (i = counters->next.fetch_add(1)) < n;) {
      fn(i);
      counters->done.fetch_add(1, std::memory_order_release);
    }
  };
  for (int64_t t = 0; t < std::min(helpers, n - 1); ++t) {
    auto task = run;  // Schedule takes its task by value
    pool.Schedule(std::move(task));
  }
  run();
  while (counters->done.load(std::memory_order_acquire) < n) std::this_thread::yield();
}

}  // namespace cpu_kernels

#endif  // JAXSPEC_CPU_KERNELS_VEC_H_
