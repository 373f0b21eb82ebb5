// A few rows times a dense weight matrix on the CPU, as an XLA FFI handler: y[N, F] = x[N, D] @ w[D, F].
//
// XLA:CPU took about 3x as long for a product of 5 rows by a weight matrix as for 1 (a general
// matrix product that packs its operands), so a verification's projections cost several times a
// decode step's. Here each weight row is read once for every row of the call (gemm.h), with panels
// of output columns split over XLA's intra-op threads.
//
// Every output element is a sum over d in ascending order, one fused multiply-add per term
// (gemm.h): a row's result does not depend on the other rows of the call, nor on how work is
// split between threads.
//
// Portable C++ (vec.h); built for the host it runs on (cpu_kernels/native.py).
#include <algorithm>
#include <cstdint>
#include <vector>

#include "xla/ffi/api/ffi.h"
#include "gemm.h"
#include "vec.h"

namespace ffi = xla::ffi;
using namespace cpu_kernels;

namespace {

constexpr int64_t kMinThreadedMacs = 1 << 17;  // multiply-adds below which one thread computes

constexpr int kRowsNt = 8;  // rows whose sums stay in registers at once in the transposed product

// y[m, f0:f0+16] for m < R, w given as [F, D] rows: 16 rows of w at a time, transposed 16 columns
// at a time, so each output's sum still runs over d ascending, one multiply-add per term.
template <int R>
void block_nt(const float* const* x, const float* w, int64_t D, int64_t f0, int64_t fcount, float* y,
              int64_t ldy) {
  vf acc[R] = {};
  const int64_t dv = D / kLanes * kLanes;
  for (int64_t d0 = 0; d0 < dv; d0 += kLanes) {
    vf t[kLanes];
    for (int l = 0; l < kLanes; ++l) t[l] = l < fcount ? load(w + (f0 + l) * D + d0) : vf{};
    transpose16(t);  // t[d][l] = w[f0 + l, d0 + d]
    for (int d = 0; d < kLanes; ++d)
      for (int m = 0; m < R; ++m) acc[m] += splat(x[m][d0 + d]) * t[d];
  }
  for (int64_t d = dv; d < D; ++d) {
    vf t = {};
    for (int l = 0; l < fcount; ++l) t[l] = w[(f0 + l) * D + d];
    for (int m = 0; m < R; ++m) acc[m] += splat(x[m][d]) * t;
  }
  for (int m = 0; m < R; ++m) {
    if (fcount == kLanes) {
      store(y + m * ldy + f0, acc[m]);
    } else {
      for (int l = 0; l < fcount; ++l) y[m * ldy + f0 + l] = acc[m][l];
    }
  }
}

// Columns [f0, f1) of y = x @ w^T, w [F, D]: 16 outputs at a time, rows of x kRowsNt at a time.
void matmul_nt(const float* const* a, int64_t N, const float* w, int64_t D, int64_t f0, int64_t f1, float* y,
               int64_t F) {
  for (; f0 < f1; f0 += kLanes) {
    const int64_t fcount = std::min<int64_t>(kLanes, f1 - f0);
    for (int64_t m = 0; m < N; m += kRowsNt) {
      const float* const* am = a + m;
      float* ym = y + m * F;
      switch (std::min<int64_t>(kRowsNt, N - m)) {
        case 1: block_nt<1>(am, w, D, f0, fcount, ym, F); break;
        case 2: block_nt<2>(am, w, D, f0, fcount, ym, F); break;
        case 3: block_nt<3>(am, w, D, f0, fcount, ym, F); break;
        case 4: block_nt<4>(am, w, D, f0, fcount, ym, F); break;
        case 5: block_nt<5>(am, w, D, f0, fcount, ym, F); break;
        case 6: block_nt<6>(am, w, D, f0, fcount, ym, F); break;
        case 7: block_nt<7>(am, w, D, f0, fcount, ym, F); break;
        default: block_nt<8>(am, w, D, f0, fcount, ym, F); break;
      }
    }
  }
}

// y[N, F] = x[N, D] @ w, w [D, F]; or with kTransposed x @ w^T, w [F, D]: a weight stored with its
// contracted axis last (a tied embedding read as the output head), without the transposed copy
// XLA's product would read it through. Panels of output columns are split over the threads.
template <bool kTransposed>
ffi::Error Dense(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w,
                 ffi::ResultBuffer<ffi::F32> y) {
  const auto xd = x.dimensions(), wd = w.dimensions();
  if (xd.size() != 2 || wd.size() != 2 || xd[1] != wd[kTransposed ? 1 : 0])
    return ffi::Error::InvalidArgument(kTransposed ? "dense_matmul_nt: x [N, D] and w [F, D]"
                                                   : "dense_matmul: x [N, D] and w [D, F]");
  const int64_t N = xd[0], D = xd[1], F = wd[kTransposed ? 0 : 1];
  const float* xp = x.typed_data();
  const float* wp = w.typed_data();
  float* yp = y->typed_data();
  if (N == 0 || F == 0) return ffi::Error::Success();

  thread_local std::vector<const float*> rows;
  rows.resize(N);
  for (int64_t n = 0; n < N; ++n) rows[n] = xp + n * D;
  const float* const* a = rows.data();
  // A small product stays on this thread: handing work to another costs more than it saves.
  const int64_t threads = N * D * F < kMinThreadedMacs ? 1 : std::max<int64_t>(pool.num_threads(), 1);
  const int64_t width = panel_width(F, threads), panels = (F + width - 1) / width;
  parallel_for(pool, panels, threads - 1, [&](int64_t item) {
    const int64_t c0 = item * width, c1 = std::min<int64_t>(F, c0 + width);
    if constexpr (kTransposed) {
      matmul_nt(a, N, wp, D, c0, c1, yp, F);
    } else {
      matmul(a, N, wp + c0, F, D, yp + c0, F, static_cast<int>(c1 - c0));
    }
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(jaxspec_dense_matmul_nt, Dense<true>,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // x [N, D]
                                  .Arg<ffi::Buffer<ffi::F32>>()  // w [F, D]
                                  .Ret<ffi::Buffer<ffi::F32>>());  // y [N, F]

XLA_FFI_DEFINE_HANDLER_SYMBOL(jaxspec_dense_matmul, Dense<false>,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // x [N, D]
                                  .Arg<ffi::Buffer<ffi::F32>>()  // w [D, F]
                                  .Ret<ffi::Buffer<ffi::F32>>());  // y [N, F]
