// Routed SwiGLU experts on the CPU, as an XLA FFI handler: y[n] = sum_j w[n, j] * FFN_{e[n, j]}(x[n]);
// ids outside [0, E) contribute nothing.
//
// XLA:CPU multiplies a few rows by a weight matrix at about half of what the memory allows, and
// copies a slice of a stacked [E, D, F] array before multiplying by it. Here each routed expert's
// rows are multiplied by its weights where they lie, streaming them once, with the work split over
// XLA's intra-op threads. Experts no token chose are never read.
//
// Every output element is a sum over its contraction index in ascending order, one fused
// multiply-add per term, and a row's expert outputs are added in ascending expert order: a row's
// result does not depend on which rows share the call, nor on how work is split between threads.
//
// Portable C++ (vec.h); built for the host it runs on (cpu_kernels/native.py).
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "xla/ffi/api/ffi.h"
#include "gemm.h"
#include "vec.h"

namespace ffi = xla::ffi;
using namespace cpu_kernels;

namespace {

// h = silu(g) * u in place, g = h; silu(g) = g / (1 + exp(-g)), written with exp(-|g|) so it never
// overflows: g >= 0: g / (1 + e); g < 0: g * e / (1 + e), e = exp(-|g|).
inline void swiglu(float* h, const float* u, int64_t count) {
  int64_t i = 0;
  for (; i + kLanes <= count; i += kLanes) {
    const vf g = load(h + i);
    const vf neg_abs = g < 0.0f ? g : -g;
    const vf e = exp_nonpositive(neg_abs);
    const vf s = (g < 0.0f ? g * e : g) / (1.0f + e);
    store(h + i, s * load(u + i));
  }
  if (i < count) {  // the tail through a padded vector, so every element takes the same arithmetic
    float gb[kLanes] = {}, ub[kLanes] = {};
    std::memcpy(gb, h + i, sizeof(float) * (count - i));
    std::memcpy(ub, u + i, sizeof(float) * (count - i));
    swiglu(gb, ub, kLanes);
    std::memcpy(h + i, gb, sizeof(float) * (count - i));
  }
}

struct Scratch {
  std::vector<float> h, u, out;
  std::vector<int64_t> count, start, fill, token;
  std::vector<float> weight;
  std::vector<const float*> xrows, hrows;
  std::vector<int64_t> active;
};

ffi::Error MoeFfn(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::S32> ids,
                  ffi::Buffer<ffi::F32> wts, ffi::Buffer<ffi::F32> w_gate, ffi::Buffer<ffi::F32> w_up,
                  ffi::Buffer<ffi::F32> w_down, ffi::ResultBuffer<ffi::F32> y) {
  const auto xd = x.dimensions(), gd = w_gate.dimensions(), dd = w_down.dimensions();
  if (xd.size() != 2 || ids.dimensions().size() != 2 || gd.size() != 3 || dd.size() != 3)
    return ffi::Error::InvalidArgument("moe_ffn: x [N, D], ids [N, k], w_gate/w_up [E, D, F], w_down [E, F, D]");
  const int64_t N = xd[0], D = xd[1], topk = ids.dimensions()[1], E = gd[0], F = gd[2];
  if (gd[1] != D || dd[0] != E || dd[1] != F || dd[2] != D || ids.dimensions()[0] != N ||
      !std::equal(gd.begin(), gd.end(), w_up.dimensions().begin()) || wts.dimensions()[0] != N ||
      wts.dimensions()[1] != topk)
    return ffi::Error::InvalidArgument("moe_ffn: shapes do not agree");
  const float* xp = x.typed_data();
  const int32_t* ip = ids.typed_data();
  const float* wp = wts.typed_data();
  float* yp = y->typed_data();

  thread_local Scratch scratch;
  Scratch& s = scratch;  // the caller's: the helpers' lambdas capture this reference
  // Routed rows grouped by expert, ascending expert, then ascending token.
  // An id outside [0, E) (a padding row's, another device's expert) counts for no expert.
  s.count.assign(E, 0);
  for (int64_t i = 0; i < N * topk; ++i)
    if (ip[i] >= 0 && ip[i] < E) s.count[ip[i]]++;
  s.start.assign(E + 1, 0);
  for (int64_t e = 0; e < E; ++e) s.start[e + 1] = s.start[e] + s.count[e];
  s.fill.assign(s.start.begin(), s.start.end() - 1);
  const int64_t A = s.start[E];  // routed rows
  s.token.resize(A);
  s.weight.resize(A);
  for (int64_t n = 0; n < N; ++n)
    for (int64_t j = 0; j < topk; ++j) {
      const int32_t e = ip[n * topk + j];
      if (e < 0 || e >= E) continue;
      s.token[s.fill[e]] = n;
      s.weight[s.fill[e]++] = wp[n * topk + j];
    }
  s.active.clear();
  for (int64_t e = 0; e < E; ++e)
    if (s.count[e] > 0) s.active.push_back(e);
  s.xrows.resize(A);
  s.hrows.resize(A);
  s.h.resize(A * F);
  s.u.resize(A * F);
  s.out.resize(A * D);
  for (int64_t r = 0; r < A; ++r) {
    s.xrows[r] = xp + s.token[r] * D;
    s.hrows[r] = s.h.data() + r * F;
  }

  const int64_t helpers = std::max<int64_t>(pool.num_threads(), 1) - 1;
  const int64_t num_active = static_cast<int64_t>(s.active.size());
  // Gate and up products, (expert, panel of columns) per item, then silu(gate) * up.
  const int64_t fwidth = panel_width(F, helpers + 1), fblocks = (F + fwidth - 1) / fwidth;
  parallel_for(pool, num_active * fblocks, helpers, [&](int64_t item) {
    const int64_t e = s.active[item / fblocks], c0 = (item % fblocks) * fwidth;
    const int cols = static_cast<int>(std::min<int64_t>(fwidth, F - c0));
    const int64_t r0 = s.start[e], rows = s.count[e];
    const float* const* a = s.xrows.data() + r0;
    matmul(a, rows, w_gate.typed_data() + e * D * F + c0, F, D, s.h.data() + r0 * F + c0, F, cols);
    matmul(a, rows, w_up.typed_data() + e * D * F + c0, F, D, s.u.data() + r0 * F + c0, F, cols);
    for (int64_t r = r0; r < r0 + rows; ++r) swiglu(s.h.data() + r * F + c0, s.u.data() + r * F + c0, cols);
  });
  // Down products into each routed row's own output, (expert, panel of columns) per item.
  const int64_t dwidth = panel_width(D, helpers + 1), dblocks = (D + dwidth - 1) / dwidth;
  parallel_for(pool, num_active * dblocks, helpers, [&](int64_t item) {
    const int64_t e = s.active[item / dblocks], c0 = (item % dblocks) * dwidth;
    const int cols = static_cast<int>(std::min<int64_t>(dwidth, D - c0));
    const int64_t r0 = s.start[e];
    matmul(s.hrows.data() + r0, s.count[e], w_down.typed_data() + e * F * D + c0, D, F,
           s.out.data() + r0 * D + c0, D, cols);
  });
  // Combine: rows are in ascending expert order, so each token's terms are added in that order.
  std::memset(yp, 0, sizeof(float) * N * D);
  for (int64_t r = 0; r < A; ++r) {
    float* yr = yp + s.token[r] * D;
    const float* o = s.out.data() + r * D;
    const float w = s.weight[r];
    for (int64_t c = 0; c < D; ++c) yr[c] += w * o[c];
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(jaxspec_moe_ffn, MoeFfn,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // x [N, D]
                                  .Arg<ffi::Buffer<ffi::S32>>()  // expert ids [N, k]
                                  .Arg<ffi::Buffer<ffi::F32>>()  // combine weights [N, k]
                                  .Arg<ffi::Buffer<ffi::F32>>()  // w_gate [E, D, F]
                                  .Arg<ffi::Buffer<ffi::F32>>()  // w_up [E, D, F]
                                  .Arg<ffi::Buffer<ffi::F32>>()  // w_down [E, F, D]
                                  .Ret<ffi::Buffer<ffi::F32>>());  // y [N, D]
