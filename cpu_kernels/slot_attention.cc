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
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "xla/ffi/api/ffi.h"
#include "vec.h"

namespace ffi = xla::ffi;
using namespace cpu_kernels;

namespace {

constexpr int64_t kPrefetchKeys = 16;

struct Scratch {
  std::vector<float> scores, inv, kt;
};

// Sum of a vector's lanes, halving the width each step (one fixed order).
inline float sum_lanes(vf v) {
  float lanes[kLanes];
  std::memcpy(lanes, &v, sizeof lanes);
  for (int width = kLanes / 2; width > 0; width /= 2)
    for (int l = 0; l < width; ++l) lanes[l] += lanes[l + width];
  return lanes[0];
}

// o[g] = sum_{j in [lo, hi)} (p[g][j] * inv[g]) v[j * stride] for NG queries that see the same keys
// (the query heads of one token), each value row read once for all of them; DV vectors of 16 per head.
template <int DV, int NG>
void weighted_sums(const float* const* p, const float* v, int64_t stride, int64_t lo, int64_t hi, const float* inv,
                   float* const* o) {
  vf acc[NG][DV] = {};
  for (int64_t j = lo; j < hi; ++j) {
    vf vj[DV];
    for (int c = 0; c < DV; ++c) vj[c] = load(v + j * stride + c * kLanes);
    for (int g = 0; g < NG; ++g) {
      const vf pg = splat(p[g][j] * inv[g]);
      for (int c = 0; c < DV; ++c) acc[g][c] += pg * vj[c];
    }
  }
  for (int g = 0; g < NG; ++g)
    for (int c = 0; c < DV; ++c) store(o[g] + c * kLanes, acc[g][c]);
}

// Up to 8 queries at a time, so that 8 / DV accumulation chains (each waits on its multiply-adds)
// run side by side.
template <int DV>
void weighted_sums_any_group(const float* const* p, const float* v, int64_t stride, int64_t lo, int64_t hi,
                             const float* inv, float* const* o, int64_t n) {
  for (int64_t g = 0; g < n; g += 8) {
    float* const* og = o + g;
    const float* const* pg = p + g;
    switch (std::min<int64_t>(8, n - g)) {
      case 1: weighted_sums<DV, 1>(pg, v, stride, lo, hi, inv + g, og); break;
      case 2: weighted_sums<DV, 2>(pg, v, stride, lo, hi, inv + g, og); break;
      case 3: weighted_sums<DV, 3>(pg, v, stride, lo, hi, inv + g, og); break;
      case 4: weighted_sums<DV, 4>(pg, v, stride, lo, hi, inv + g, og); break;
      case 5: weighted_sums<DV, 5>(pg, v, stride, lo, hi, inv + g, og); break;
      case 6: weighted_sums<DV, 6>(pg, v, stride, lo, hi, inv + g, og); break;
      case 7: weighted_sums<DV, 7>(pg, v, stride, lo, hi, inv + g, og); break;
      default: weighted_sums<DV, 8>(pg, v, stride, lo, hi, inv + g, og); break;
    }
  }
}

// The same for any head dim, one key at a time.
void weighted_sum_any(const float* p, const float* v, int64_t stride, int64_t lo, int64_t hi, float inv, float* o,
                      int64_t Dh) {
  std::memset(o, 0, sizeof(float) * Dh);
  for (int64_t j = lo; j < hi; ++j) {
    const float pj = p[j] * inv;
    for (int64_t d = 0; d < Dh; ++d) o[d] += pj * v[j * stride + d];
  }
}

// Query tokens attended together: each key and value is read once for all of them.
constexpr int64_t kTokensTogether = 8;
constexpr int64_t kQueriesTogether = 8;
constexpr int64_t kMaxGroup = 64;  // query heads per kv head

// Tokens [t0, t1) of one (row, kv head), every query head of the group: scores key by key, a softmax
// per query, then values key by key. Scores sit at index j - base with base a multiple of kLanes, so
// a query's lanes hold the same keys whichever tokens share the call.
void attend_tokens(const float* q, const float* kc, const float* vc, const int32_t* pos, float* out, int64_t t0,
                   int64_t t1, int64_t H, int64_t G, int64_t Dh, int64_t KVH, int64_t kv_len, int64_t window,
                   int64_t kh, Scratch& s) {
  const float scale = 1.0f / std::sqrt(static_cast<float>(Dh));
  const int64_t kstride = KVH * Dh;  // between positions of one head
  int64_t lo[kTokensTogether], hi[kTokensTogether];
  int64_t lo_min = kv_len, hi_max = 0;
  for (int64_t t = t0; t < t1; ++t) {
    const int64_t p = pos[t];
    hi[t - t0] = std::min<int64_t>(p + 1, kv_len);
    lo[t - t0] = window > 0 ? std::max<int64_t>(0, p - window + 1) : 0;
    if (hi[t - t0] > lo[t - t0]) {
      lo_min = std::min(lo_min, lo[t - t0]);
      hi_max = std::max(hi_max, hi[t - t0]);
    }
  }
  const int64_t base = hi_max > lo_min ? lo_min / kLanes * kLanes : 0;
  const int64_t width = std::max<int64_t>(hi_max - base + kLanes - 1, 0) / kLanes * kLanes;
  const int64_t queries = (t1 - t0) * G;
  s.scores.assign(static_cast<size_t>(queries * width), -INFINITY);
  s.inv.resize(queries);
  // Scores 16 keys at a time: the block's keys transposed ([Dh][16]), then each query's 16 scores
  // as Dh multiply-adds of its broadcast entries (d ascending).
  s.kt.resize(static_cast<size_t>(Dh) * kLanes);
  for (int64_t b0 = base; b0 < hi_max; b0 += kLanes) {
    const int64_t b1 = std::min<int64_t>(b0 + kLanes, hi_max);
    for (int64_t j = b0; j < b1; ++j) {
      const float* kj = kc + j * kstride + kh * Dh;
      // The cache is cold inside a forward (the experts' weights stream through between layers):
      // ask for keys and values well ahead of their use.
      for (int64_t d = 0; d < Dh; d += kLanes) {
        __builtin_prefetch(kj + kPrefetchKeys * kstride + d);
        __builtin_prefetch(vc + (j + kPrefetchKeys) * kstride + kh * Dh + d);
      }
    }
    // Whole vectors of 16 dims through the shuffle transpose, the rest one entry at a time.
    const int64_t dv = Dh / kLanes * kLanes;
    for (int64_t d0 = 0; d0 < dv; d0 += kLanes) {
      vf rows[kLanes];
      for (int64_t j = b0; j < b0 + kLanes; ++j)
        rows[j - b0] = j < b1 ? load(kc + j * kstride + kh * Dh + d0) : vf{};
      transpose16(rows);
      for (int l = 0; l < kLanes; ++l) store(s.kt.data() + (d0 + l) * kLanes, rows[l]);
    }
    for (int64_t j = b0; j < b0 + kLanes; ++j)
      for (int64_t d = dv; d < Dh; ++d) s.kt[d * kLanes + (j - b0)] = j < b1 ? kc[j * kstride + kh * Dh + d] : 0.0f;
    // The queries that see a key of this block, up to kQueriesTogether at a time: their d-ascending
    // sums run side by side (one chain each would wait on every multiply-add).
    int64_t seen[kTokensTogether * kMaxGroup];
    int64_t num_seen = 0;
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t tl = t - t0;
      if (b1 <= lo[tl] || b0 >= hi[tl]) continue;  // no key of this block is visible to it
      for (int64_t g = 0; g < G; ++g) seen[num_seen++] = tl * G + g;
    }
    for (int64_t first = 0; first < num_seen; first += kQueriesTogether) {
      const int64_t n = std::min<int64_t>(kQueriesTogether, num_seen - first);
      const float* qv[kQueriesTogether];
      vf acc[kQueriesTogether] = {};
      for (int64_t r = 0; r < n; ++r) {
        const int64_t i = seen[first + r];
        qv[r] = q + ((t0 + i / G) * H + kh * G + i % G) * Dh;
      }
      const float* kt = s.kt.data();
      for (int64_t d = 0; d < Dh; ++d) {
        const vf kd = load(kt + d * kLanes);
        for (int64_t r = 0; r < n; ++r) acc[r] += splat(qv[r][d]) * kd;
      }
      for (int64_t r = 0; r < n; ++r) {
        const int64_t i = seen[first + r], tl = i / G;
        float* sc = s.scores.data() + i * width + (b0 - base);
        store(sc, acc[r] * scale);
        for (int64_t j = b0; j < b0 + kLanes; ++j)
          if (j < lo[tl] || j >= hi[tl]) sc[j - b0] = -INFINITY;
      }
    }
  }
  for (int64_t i = 0; i < queries; ++i) {
    float* sc = s.scores.data() + i * width;
    vf vmax = splat(-INFINITY);
    for (int64_t c = 0; c < width; c += kLanes) {
      const vf x = load(sc + c);
      vmax = vmax > x ? vmax : x;
    }
    float m = vmax[0];
    for (int l = 1; l < kLanes; ++l) m = std::max(m, vmax[l]);
    if (m == -INFINITY) {  // sees no key (only a padding query can): zeros
      s.inv[i] = 0.0f;
      continue;
    }
    vf vsum = {};
    for (int64_t c = 0; c < width; c += kLanes) {
      const vf e = exp_nonpositive(load(sc + c) - m);  // keys it does not see: exp(-inf) = 0
      store(sc + c, e);
      vsum += e;
    }
    s.inv[i] = 1.0f / sum_lanes(vsum);
  }
  // out = sum_j p_j v_j per query, j ascending: the query heads of a token together.
  for (int64_t t = t0; t < t1; ++t) {
    const int64_t tl = t - t0;
    const float* p[kMaxGroup];
    float* o[kMaxGroup];
    float inv[kMaxGroup];
    int64_t n = 0;
    for (int64_t g = 0; g < G; ++g) {
      const int64_t i = tl * G + g;
      float* og = out + (t * H + kh * G + g) * Dh;
      if (s.inv[i] == 0.0f) {  // sees no key: zeros
        std::memset(og, 0, sizeof(float) * Dh);
        continue;
      }
      p[n] = s.scores.data() + i * width - base;  // p[n][j]: key j's weight before 1 / sum
      o[n] = og;
      inv[n++] = s.inv[i];
    }
    const float* v0 = vc + kh * Dh;
    switch (Dh) {
      case 16: weighted_sums_any_group<1>(p, v0, kstride, lo[tl], hi[tl], inv, o, n); break;
      case 32: weighted_sums_any_group<2>(p, v0, kstride, lo[tl], hi[tl], inv, o, n); break;
      case 64: weighted_sums_any_group<4>(p, v0, kstride, lo[tl], hi[tl], inv, o, n); break;
      case 128: weighted_sums_any_group<8>(p, v0, kstride, lo[tl], hi[tl], inv, o, n); break;
      default:
        for (int64_t r = 0; r < n; ++r) weighted_sum_any(p[r], v0, kstride, lo[tl], hi[tl], inv[r], o[r], Dh);
    }
  }
}

// One (row, kv head): every query token and query head of the group.
void attend_group(const float* q, const float* kc, const float* vc, const int32_t* pos, float* out, int64_t T,
                  int64_t H, int64_t G, int64_t Dh, int64_t KVH, int64_t kv_len, int64_t window, int64_t kh,
                  Scratch& s) {
  for (int64_t t0 = 0; t0 < T; t0 += kTokensTogether)
    attend_tokens(q, kc, vc, pos, out, t0, std::min(T, t0 + kTokensTogether), H, G, Dh, KVH, kv_len, window, kh, s);
}

ffi::Error SlotAttention(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k,
                         ffi::Buffer<ffi::F32> v, ffi::Buffer<ffi::S32> slots, ffi::Buffer<ffi::S32> positions,
                         ffi::ResultBuffer<ffi::F32> out, int64_t layer, int64_t kv_len, int64_t window) {
  const auto qd = q.dimensions(), kd = k.dimensions();
  if (qd.size() != 4 || kd.size() != 5 || v.dimensions().size() != 5)
    return ffi::Error::InvalidArgument("slot_attention: q [B, T, H, Dh], k/v [L, S, M, KVH, Dh]");
  const int64_t B = qd[0], T = qd[1], H = qd[2], Dh = qd[3];
  const int64_t L = kd[0], S = kd[1], M = kd[2], KVH = kd[3];
  if (kd[4] != Dh || KVH == 0 || H % KVH != 0 || H / KVH > kMaxGroup || layer < 0 || layer >= L ||
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
