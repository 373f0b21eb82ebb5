// A few rows times a weight matrix that lies where it is, for the CPU kernels: each block of kCols
// output columns streams its weight rows once for up to kRows input rows, and every output element
// is a sum over the contraction index in ascending order, one fused multiply-add per term, so a
// row's result does not depend on the other rows of the product.
#ifndef JAXSPEC_CPU_KERNELS_GEMM_H_
#define JAXSPEC_CPU_KERNELS_GEMM_H_

#include <cstdint>

#include "vec.h"

namespace cpu_kernels {

constexpr int kVecs = 4;                  // vectors per row of a block
constexpr int kCols = kLanes * kVecs;     // output columns per block
constexpr int kRows = 6;                  // rows per block: kRows * kVecs accumulators in registers
constexpr int kPrefetchRows = 8;          // weight rows ahead of the one being read

// c[m, 0:kCols] = sum_k a[m][k] * b[k, 0:kCols] for m < R.
template <int R>
inline void block(const float* const* a, const float* b, int64_t ldb, int64_t depth, float* c, int64_t ldc) {
  vf acc[R][kVecs] = {};
  for (int64_t k = 0; k < depth; ++k) {
    const float* row = b + k * ldb;
    for (int v = 0; v < kVecs; ++v) __builtin_prefetch(row + kPrefetchRows * ldb + v * kLanes);
    vf bv[kVecs];
    for (int v = 0; v < kVecs; ++v) bv[v] = load(row + v * kLanes);
    for (int m = 0; m < R; ++m) {
      const vf av = splat(a[m][k]);
      for (int v = 0; v < kVecs; ++v) acc[m][v] += av * bv[v];
    }
  }
  for (int m = 0; m < R; ++m)
    for (int v = 0; v < kVecs; ++v) store(c + m * ldc + v * kLanes, acc[m][v]);
}

// The last columns of a row, fewer than kCols: one at a time, same order of terms.
inline void narrow(const float* const* a, int64_t rows, const float* b, int64_t ldb, int64_t depth, float* c,
            int64_t ldc, int cols) {
  for (int64_t m = 0; m < rows; ++m)
    for (int j = 0; j < cols; ++j) {
      float acc = 0.0f;
      for (int64_t k = 0; k < depth; ++k) acc += a[m][k] * b[k * ldb + j];
      c[m * ldc + j] = acc;
    }
}

// c[0:rows, 0:cols] = a[0:rows] (row pointers, depth long) @ b[0:depth, 0:cols] (row stride ldb).
inline void matmul(const float* const* a, int64_t rows, const float* b, int64_t ldb, int64_t depth, float* c,
            int64_t ldc, int cols) {
  if (cols < kCols) return narrow(a, rows, b, ldb, depth, c, ldc, cols);
  int64_t m = 0;
  for (; m + kRows <= rows; m += kRows) block<kRows>(a + m, b, ldb, depth, c + m * ldc, ldc);
  switch (rows - m) {
    case 1: block<1>(a + m, b, ldb, depth, c + m * ldc, ldc); break;
    case 2: block<2>(a + m, b, ldb, depth, c + m * ldc, ldc); break;
    case 3: block<3>(a + m, b, ldb, depth, c + m * ldc, ldc); break;
    case 4: block<4>(a + m, b, ldb, depth, c + m * ldc, ldc); break;
    case 5: block<5>(a + m, b, ldb, depth, c + m * ldc, ldc); break;
    default: break;
  }
}

}  // namespace cpu_kernels

#endif  // JAXSPEC_CPU_KERNELS_GEMM_H_
