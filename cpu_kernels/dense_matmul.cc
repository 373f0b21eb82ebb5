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

ffi::Error DenseMatmul(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w,
                       ffi::ResultBuffer<ffi::F32> y) {
  const auto xd = x.dimensions(), wd = w.dimensions();
  if (xd.size() != 2 || wd.size() != 2 || xd[1] != wd[0])
    return ffi::Error::InvalidArgument("dense_matmul: x [N, D] and w [D, F]");
  const int64_t N = xd[0], D = xd[1], F = wd[1];
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
    const int64_t c0 = item * width;
    const int cols = static_cast<int>(std::min<int64_t>(width, F - c0));
    matmul(a, N, wp + c0, F, D, yp + c0, F, cols);
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(jaxspec_dense_matmul, DenseMatmul,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // x [N, D]
                                  .Arg<ffi::Buffer<ffi::F32>>()  // w [D, F]
                                  .Ret<ffi::Buffer<ffi::F32>>());  // y [N, F]
