// A few rows times a weight matrix that lies where it is, for the CPU kernels: blocks of output
// columns by up to kRows rows keep their sums in registers and read each weight row once per
// block of rows. Every output element is a sum over the contraction index in ascending order, one
// fused multiply-add per term, whichever block computes it, so a row's result does not depend on
// the other rows of the product nor on how its columns are split. Callers split the columns in
// panels of kPanel over threads.
#ifndef JAXSPEC_CPU_KERNELS_GEMM_H_
#define JAXSPEC_CPU_KERNELS_GEMM_H_

#include <algorithm>
#include <cstdint>

#include "vec.h"

namespace cpu_kernels {

constexpr int kRows = 6;                  // rows per block: kRows x 4 vectors of sums in registers
constexpr int kCols = kLanes * 4;         // the narrowest block's columns
constexpr int kPrefetchRows = 8;          // weight rows ahead of the one being read
constexpr int kPanel = 512;               // most columns per unit of work (2 KiB of a float32 weight row)

// Columns per unit of work for a product `cols` wide over `threads`: about two units per thread,
// whole 64-column blocks, at most kPanel.
inline int64_t panel_width(int64_t cols, int64_t threads) {
  const int64_t share = (cols / std::max<int64_t>(2 * threads, 1) + kCols - 1) / kCols * kCols;
  return std::clamp<int64_t>(share, kCols, kPanel);
}

// c[m, 0:V*16] = sum_k a[m][k] * b[k, 0:V*16] for m < R. Few rows take wide blocks (V = 16 for one
// row): each weight row is then read as one contiguous run of V*64 bytes, which a strided walk down
// 64-column strips was not (a 192 x 4096 product at one row ran at two thirds of XLA's speed).
template <int R, int V>
inline void block(const float* const* a, const float* b, int64_t ldb, int64_t depth, float* c, int64_t ldc) {
  vf acc[R][V] = {};
  for (int64_t k = 0; k < depth; ++k) {
    const float* row = b + k * ldb;
    for (int v = 0; v < V; v += 1) __builtin_prefetch(row + kPrefetchRows * ldb + v * kLanes);
    for (int v = 0; v < V; ++v) {
      const vf w = load(row + v * kLanes);
      for (int m = 0; m < R; ++m) acc[m][v] += splat(a[m][k]) * w;
    }
  }
  for (int m = 0; m < R; ++m)
    for (int v = 0; v < V; ++v) store(c + m * ldc + v * kLanes, acc[m][v]);
}

// The last columns of a row, fewer than kCols: one at a time, same order of terms (the fused
// multiply-add spelled out: the compiler may not contract a scalar sum as it does the vectors').
inline void narrow(const float* const* a, int64_t rows, const float* b, int64_t ldb, int64_t depth, float* c,
                   int64_t ldc, int cols) {
  for (int64_t m = 0; m < rows; ++m)
    for (int j = 0; j < cols; ++j) {
      float acc = 0.0f;
      for (int64_t k = 0; k < depth; ++k) acc = __builtin_fmaf(a[m][k], b[k * ldb + j], acc);
      c[m * ldc + j] = acc;
    }
}

// Columns [c0, cols) of R rows: blocks of V vectors while they fit, then of 4.
template <int R, int V>
inline int blocks(const float* const* a, const float* b, int64_t ldb, int64_t depth, float* c, int64_t ldc, int cols) {
  int c0 = 0;
  for (; c0 + V * kLanes <= cols; c0 += V * kLanes) block<R, V>(a, b + c0, ldb, depth, c + c0, ldc);
  if constexpr (V > 4) {
    for (; c0 + kCols <= cols; c0 += kCols) block<R, 4>(a, b + c0, ldb, depth, c + c0, ldc);
  }
  return c0;
}

template <int R>
inline int row_blocks(const float* const* a, const float* b, int64_t ldb, int64_t depth, float* c, int64_t ldc,
                      int cols) {
  if constexpr (R == 1) return blocks<1, 16>(a, b, ldb, depth, c, ldc, cols);
  if constexpr (R == 2) return blocks<2, 8>(a, b, ldb, depth, c, ldc, cols);
  return blocks<R, 4>(a, b, ldb, depth, c, ldc, cols);
}

// c[0:rows, 0:cols] = a[0:rows] (row pointers, depth long) @ b[0:depth, 0:cols] (row stride ldb).
inline void matmul(const float* const* a, int64_t rows, const float* b, int64_t ldb, int64_t depth, float* c,
                   int64_t ldc, int cols) {
  int done = 0;
  for (int64_t m = 0; m < rows; m += kRows) {
    const float* const* am = a + m;
    float* cm = c + m * ldc;
    switch (std::min<int64_t>(kRows, rows - m)) {
      case 1: done = row_blocks<1>(am, b, ldb, depth, cm, ldc, cols); break;
      case 2: done = row_blocks<2>(am, b, ldb, depth, cm, ldc, cols); break;
      case 3: done = row_blocks<3>(am, b, ldb, depth, cm, ldc, cols); break;
      case 4: done = row_blocks<4>(am, b, ldb, depth, cm, ldc, cols); break;
      case 5: done = row_blocks<5>(am, b, ldb, depth, cm, ldc, cols); break;
      default: done = row_blocks<6>(am, b, ldb, depth, cm, ldc, cols); break;
    }
  }
  if (done < cols) narrow(a, rows, b + done, ldb, depth, c + done, ldc, cols - done);
}

}  // namespace cpu_kernels

#endif  // JAXSPEC_CPU_KERNELS_GEMM_H_
