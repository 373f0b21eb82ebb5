// Causal grouped-query attention of new tokens against their slot's cache, read in place, on the
// CPU, as an XLA FFI handler.
//
// out[b, t, h] = softmax_j(q[b, t, h] . k[layer, s, j, h / G] / sqrt(Dh)) v[layer, s, j, h / G] over
// the keys j visible to the query at position p = pos[b, t]: j <= p, j < kv_len, and with a window
// W > 0 also j > p - W; s = slots[b]. A row whose slot is out of range (padding) gets zeros.
//
// XLA reads the [B, kv_len] block of every row's cache (a gathered copy, then transposes); here each
// query reads only the keys it sees, where they lie. A query's result depends on its own inputs only,
// with its sums in one fixed order: a token gets the same bits in a decode and in a verification.
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <thread>
#include <vector>

#include "xla/ffi/api/ffi.h"
#include "vec.h"

namespace ffi = xla::ffi;
using namespace cpu_kernels;

namespace {

constexpr int kBlock = kLanes;  // keys per block of scores
constexpr int kMaxHeadDim = 256;

struct Scratch {
  std::vector<float> scores, kt;
};

// One (row, kv head): every query token and query head of the group.
void attend_group(const float* q, const float* kc, const float* vc, const int32_t* pos, float* out,
                  int64_t T, int64_t H, int64_t G, int64_t Dh, int64_t KVH, int64_t kv_len, int64_t window,
                  int64_t kh, Scratch& s) {
  const float scale = 1.0f / std::sqrt(static_cast<float>(Dh));
  const int64_t kstride = KVH * Dh;  // between positions of one head
  int64_t max_hi = 0;
  for (int64_t t = 0; t < T; ++t) max_hi = std::max<int64_t>(max_hi, std::min<int64_t>(pos[t] + 1, kv_len));
  const int64_t blocks = (max_hi + kBlock - 1) / kBlock;
  // Keys of this head transposed block by block: kt[block][d][lane], zero past max_hi.
  s.kt.assign(static_cast<size_t>(std::max<int64_t>(blocks, 1)) * Dh * kBlock, 0.0f);
  for (int64_t j = 0; j < max_hi; ++j) {
    const float* kj = kc + j * kstride + kh * Dh;
    float* dst = s.kt.data() + (j / kBlock) * Dh * kBlock + (j % kBlock);
    for (int64_t d = 0; d < Dh; ++d) dst[d * kBlock] = kj[d];
  }
  s.scores.resize(static_cast<size_t>(std::max<int64_t>(blocks, 1)) * kBlock);
  for (int64_t t = 0; t < T; ++t) {
    const int64_t p = pos[t];
    const int64_t hi = std::min<int64_t>(p + 1, kv_len);
    const int64_t lo = window > 0 ? std::max<int64_t>(0, p - window + 1) : 0;
    for (int64_t g = 0; g < G; ++g) {
      const int64_t h = kh * G + g;
      const float* qv = q + (t * H + h) * Dh;
      float* o = out + (t * H + h) * Dh;
      if (hi <= lo) {  // sees no key (only a padding query can): zeros
        std::memset(o, 0, sizeof(float) * Dh);
        continue;
      }
      // Scores of blocks [lo / kBlock, ceil(hi / kBlock)), 16 keys at a time, d ascending.
      const int64_t b0 = lo / kBlock, b1 = (hi + kBlock - 1) / kBlock;
      vf vmax = splat(-INFINITY);
      for (int64_t blk = b0; blk < b1; ++blk) {
        const float* kt = s.kt.data() + blk * Dh * kBlock;
        vf acc = {};
        for (int64_t d = 0; d < Dh; ++d) acc += splat(qv[d]) * load(kt + d * kBlock);
        acc *= scale;
        // Keys outside [lo, hi) of this block out of the softmax.
        const int64_t j0 = blk * kBlock;
        vf masked;
        for (int l = 0; l < kBlock; ++l) masked[l] = (j0 + l >= lo && j0 + l < hi) ? acc[l] : -INFINITY;
        store(s.scores.data() + blk * kBlock, masked);
        vmax = vmax > masked ? vmax : masked;
      }
      float m = vmax[0];
      for (int l = 1; l < kLanes; ++l) m = std::max(m, vmax[l]);
      vf vsum = {};
      for (int64_t blk = b0; blk < b1; ++blk) {
        float* sc = s.scores.data() + blk * kBlock;
        const vf e = exp_nonpositive(load(sc) - m);  // exp(-inf) -> 0 (clamped, then scaled to 0)
        store(sc, e);
        vsum += e;
      }
      float sum = 0.0f;
      for (int l = 0; l < kLanes; ++l) sum += vsum[l];
      const float inv = 1.0f / sum;
      // out = sum_j p_j v_j, j ascending, Dh in vectors (a scalar tail for Dh not a multiple of 16).
      float acc[kMaxHeadDim] = {};
      for (int64_t j = lo; j < hi; ++j) {
        const float pj = s.scores[j] * inv;
        const float* vj = vc + j * kstride + kh * Dh;
        int64_t d = 0;
        for (; d + kLanes <= Dh; d += kLanes) store(acc + d, load(acc + d) + splat(pj) * load(vj + d));
        for (; d < Dh; ++d) acc[d] += pj * vj[d];
      }
      std::memcpy(o, acc, sizeof(float) * Dh);
    }
  }
}

ffi::Error SlotAttention(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k,
                         ffi::Buffer<ffi::F32> v, ffi::Buffer<ffi::S32> slots, ffi::Buffer<ffi::S32> positions,
                         ffi::ResultBuffer<ffi::F32> out, int64_t layer, int64_t kv_len, int64_t window) {
  const auto qd = q.dimensions(), kd = k.dimensions();
  if (qd.size() != 4 || kd.size() != 5 || v.dimensions().size() != 5)
    return ffi::Error::InvalidArgument("slot_attention: q [B, T, H, Dh], k/v [L, S, M, KVH, Dh]");
  const int64_t B = qd[0], T = qd[1], H = qd[2], Dh = qd[3];
  const int64_t L = kd[0], S = kd[1], M = kd[2], KVH = kd[3];
  if (kd[4] != Dh || KVH == 0 || H % KVH != 0 || Dh > kMaxHeadDim || layer < 0 || layer >= L ||
      !std::equal(kd.begin(), kd.end(), v.dimensions().begin()) || slots.dimensions()[0] != B ||
      positions.dimensions()[0] != B || positions.dimensions()[1] != T)
    return ffi::Error::InvalidArgument("slot_attention: shapes do not agree");
  kv_len = std::min(kv_len, M);
  const int64_t G = H / KVH;
  const float* qp = q.typed_data();
  const int32_t* sp = slots.typed_data();
  const int32_t* pp = positions.typed_data();
  float* op = out->typed_data();
  const int64_t slot_elems = M * KVH * Dh;
  const float* kbase = k.typed_data() + layer * S * slot_elems;
  const float* vbase = v.typed_data() + layer * S * slot_elems;
  const int64_t helpers = std::max<int64_t>(pool.num_threads(), 1) - 1;
  parallel_for(pool, B * KVH, helpers, [&](int64_t item) {
    thread_local Scratch scratch;
    const int64_t b = item / KVH, kh = item % KVH;
    float* ob = op + b * T * H * Dh;
    const int32_t slot = sp[b];
    if (slot < 0 || slot >= S) {  // a padding row
      for (int64_t t = 0; t < T; ++t)
        for (int64_t g = 0; g < G; ++g) std::memset(ob + (t * H + kh * G + g) * Dh, 0, sizeof(float) * Dh);
      return;
    }
    attend_group(qp + b * T * H * Dh, kbase + slot * slot_elems, vbase + slot * slot_elems, pp + b * T, ob, T, H,
                 G, Dh, KVH, kv_len, window, kh, scratch);
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(jaxspec_slot_attention, SlotAttention,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // q [B, T, H, Dh]
                                  .Arg<ffi::Buffer<ffi::F32>>()  // k cache [L, S, M, KVH, Dh]
                                  .Arg<ffi::Buffer<ffi::F32>>()  // v cache [L, S, M, KVH, Dh]
                                  .Arg<ffi::Buffer<ffi::S32>>()  // slot of each row [B]
                                  .Arg<ffi::Buffer<ffi::S32>>()  // query positions [B, T]
                                  .Ret<ffi::Buffer<ffi::F32>>()  // [B, T, H, Dh]
                                  .Attr<int64_t>("layer")
                                  .Attr<int64_t>("kv_len")
                                  .Attr<int64_t>("window"));
