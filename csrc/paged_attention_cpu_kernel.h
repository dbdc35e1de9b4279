// Pre-RoPE paged attention, CPU kernel. Header-only, raw pointers, no torch headers.
//
// One call attends query rows [i0, i1) of one sequence, for one kv head and its
// group of q heads, over keys [k0, k1), and leaves the online-softmax state
// (running max m, denominator l, unnormalised acc) for the caller to merge or
// normalise. Keys are read from the paged cache *before* RoPE and rotated as
// they are loaded, with the sequence's own angles: that is what lets the YaRN
// scale follow each sequence's length (Dynamic YaRN). Semantics:
// yarn_vllm/attention/reference.py.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <limits>
#include <vector>

#include "cpu_elements.h"
#include "paged_attention_checks.h"  // kAngleStride: the angle table is part of the contract

#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#define YARN_PAGED_AVX2 1
#include "cpu_simd.h"
#endif

namespace yarn {

constexpr int kKeyTile = 32;  // keys rotated and scored together; one L1-resident tile

struct PagedShape {
  int num_q_heads, num_kv_heads, head_size, rotary_dim, block_size;
  bool is_neox;
  int64_t q_token_stride, q_head_stride;
  int64_t k_block_stride, k_head_stride, k_row_stride;
  int64_t v_block_stride, v_head_stride, v_row_stride;
};

// What the kernel needs of one sequence. Angles come from `cos_sin` or, when it
// is null, are computed from `inv_freq` in fp32 per row. `cos_sin` holds
// kAngleStride "fine" rows (offsets m = 0..31) and then one "coarse" row per
// 32 positions (0, 32, 64, ...), each [cos | sin]; the angle of t is composed as
// coarse[t / 32] * fine[t % 32] (a complex product). A step's table is thus
// O(seq_len / 32) rows, built once in double precision and read by every layer,
// instead of a full [seq_len, rotary_dim] table that would cost as much memory
// traffic as the keys.
struct PagedSequence {
  const int32_t* blocks;
  int seq_len, q_len;
  int64_t q_start;  // first query token in the batch
  float logit_scale;
  const float* cos_sin;
  const float* inv_freq;
};

// A float buffer starting on a 64-byte boundary, so that full-width vector loads and
// stores never straddle two cache lines. Its contents are scratch: get() may move them.
class Aligned {
 public:
  float* get(size_t n) {
    storage_.resize(n + 16);
    const auto p = reinterpret_cast<uintptr_t>(storage_.data());
    return reinterpret_cast<float*>((p + 63) & ~uintptr_t{63});
  }

 private:
  std::vector<float> storage_;
};

// Buffers of the tile loops, one set per thread, reused across its work items.
struct Scratch {
  Aligned q, scores, rotated, turned, cs, corr, key, key_t, vals;
};

// Online-softmax state of `rows` query rows: m[rows], l[rows], acc[rows * head_size].
struct SoftmaxState {
  std::vector<float> m, l, acc;
  void reset(int rows, int head_size) {
    m.assign(rows, -std::numeric_limits<float>::infinity());
    l.assign(rows, 0.f);
    acc.assign(static_cast<size_t>(rows) * head_size, 0.f);
  }
};

// max that keeps a NaN (std::max drops one in either position): a NaN logit must
// reach the output, as it does in the reference's softmax.
inline float nan_max(float a, float b) { return (a != a || b != b) ? a + b : std::max(a, b); }

// Folds the state of another split of the same rows' keys into `into` (split-K):
// both are rescaled to the larger running max, then sums and accumulators add.
inline void merge_states(SoftmaxState& into, const SoftmaxState& from, int head_size) {
  const int rows = static_cast<int>(into.m.size());
  for (int r = 0; r < rows; ++r) {
    if (from.m[r] == -std::numeric_limits<float>::infinity()) continue;  // saw no key
    const float m = nan_max(into.m[r], from.m[r]);
    const float a = std::exp(into.m[r] - m), c = std::exp(from.m[r] - m);
    into.l[r] = into.l[r] * a + from.l[r] * c;
    into.m[r] = m;
    float* acc = into.acc.data() + static_cast<size_t>(r) * head_size;
    const float* other = from.acc.data() + static_cast<size_t>(r) * head_size;
    for (int d = 0; d < head_size; ++d) acc[d] = acc[d] * a + other[d] * c;
  }
}

namespace detail {

// x[j] = exp(x[j] - shift) for j < kKeyTile (the generic path's softmax).
inline void exp_shifted(float* x, float shift) {
#if YARN_PAGED_AVX2
  const __m256 s = _mm256_set1_ps(shift);
  for (int j = 0; j < kKeyTile; j += 8)
    _mm256_storeu_ps(x + j, simd::F32x8::exp(_mm256_sub_ps(_mm256_loadu_ps(x + j), s)));
#else
  for (int j = 0; j < kKeyTile; ++j) x[j] = std::exp(x[j] - shift);
#endif
}

inline const float* fine_row(const PagedSequence& seq, int position, int half) {
  return seq.cos_sin + static_cast<int64_t>(position % kAngleStride) * 2 * half;
}
inline const float* coarse_row(const PagedSequence& seq, int position, int half) {
  return seq.cos_sin + static_cast<int64_t>(kAngleStride + position / kAngleStride) * 2 * half;
}

inline void angles_row(const PagedSequence& seq, int position, int half, float* row) {
  if (seq.cos_sin != nullptr) {
    const float* f = fine_row(seq, position, half);
    const float* c = coarse_row(seq, position, half);
    for (int j = 0; j < half; ++j) {
      row[j] = c[j] * f[j] - c[half + j] * f[half + j];
      row[half + j] = c[half + j] * f[j] + c[j] * f[half + j];
    }
    return;
  }
  for (int j = 0; j < half; ++j) {
    const float a = static_cast<float>(position) * seq.inv_freq[j];
    row[j] = std::cos(a);
    row[half + j] = std::sin(a);
  }
}

// Rotates x (head_size channels, fp32) with one row of cos | sin, in place.
inline void rotate(float* x, const float* cs, int rotary_dim, bool is_neox) {
  const int half = rotary_dim / 2;
  const float* c = cs;
  const float* s = cs + half;
  if (is_neox) {
    for (int j = 0; j < half; ++j) {
      const float x1 = x[j], x2 = x[half + j];
      x[j] = x1 * c[j] - x2 * s[j];
      x[half + j] = x2 * c[j] + x1 * s[j];
    }
  } else {
    for (int j = 0; j < half; ++j) {
      const float x1 = x[2 * j], x2 = x[2 * j + 1];
      x[2 * j] = x1 * c[j] - x2 * s[j];
      x[2 * j + 1] = x2 * c[j] + x1 * s[j];
    }
  }
}

// Row pointers of cache rows [kt, kt + n) of one kv head, walking the block table
// (a tile may cross blocks when block_size is not a multiple of kKeyTile).
template <typename T>
void tile_rows(const PagedShape& sh, const PagedSequence& seq, const T* cache, int64_t block_stride,
               int64_t head_stride, int64_t row_stride, int kv_head, int kt, int n,
               const T** rows) {
  int block = kt / sh.block_size, row = kt % sh.block_size;
  const T* base = cache + kv_head * head_stride;
  // one block's rows at a time: a step of row_stride each, not an index product per row
  for (int j = 0; j < n; row = 0, ++block) {
    const T* p = base + seq.blocks[block] * block_stride + row * row_stride;
    for (const int end = std::min(n, j + sh.block_size - row); j < end; ++j, p += row_stride)
      rows[j] = p;
  }
}

// Key and value row pointers of one kv head's tiles of N keys: this tile's (k, v) and the
// next one's (k_next, v_next), filled a tile ahead so that they can be prefetched while
// this one computes. Not copyable: its pointers point into itself.
template <typename T, int N>
class KvRows {
 public:
  KvRows(const PagedShape& sh, const PagedSequence& seq, const T* key_cache,
         const T* value_cache, int kv_head)
      : sh_(sh), seq_(seq), key_cache_(key_cache), value_cache_(value_cache), kv_head_(kv_head) {}
  KvRows(const KvRows&) = delete;
  KvRows& operator=(const KvRows&) = delete;

  // rows of keys [kt, kt + n) into k_next, v_next
  void load_next(int kt, int n) {
    tile_rows(sh_, seq_, key_cache_, sh_.k_block_stride, sh_.k_head_stride, sh_.k_row_stride,
              kv_head_, kt, n, k_next);
    tile_rows(sh_, seq_, value_cache_, sh_.v_block_stride, sh_.v_head_stride, sh_.v_row_stride,
              kv_head_, kt, n, v_next);
  }
  void advance() {
    std::swap(k, k_next);
    std::swap(v, v_next);
  }

 private:
  const T* rows_[4][N];

 public:
  const T** k = rows_[0];
  const T** v = rows_[1];
  const T** k_next = rows_[2];
  const T** v_next = rows_[3];

 private:
  const PagedShape& sh_;
  const PagedSequence& seq_;
  const T* key_cache_;
  const T* value_cache_;
  int kv_head_;
};

}  // namespace detail

}  // namespace yarn

#if YARN_PAGED_AVX2
#include "paged_attention_cpu_simd.h"
#include "paged_prefill_cpu_simd.h"
#endif

namespace yarn {
namespace detail {

// Portable tile: keys rotated into a [D][tile] transpose so that scores vectorise
// over keys; values staged in `vals` for tile_values_generic.
template <typename T>
void tile_scores_generic(const PagedShape& sh, const PagedSequence& seq, const float* q, int rows,
                         const T* key_cache, const T* value_cache, int kv_head, int kt, int n,
                         float* scores, float* cs, float* key, float* key_t, float* vals) {
  const int D = sh.head_size, half = sh.rotary_dim / 2;
  for (int j = 0; j < kKeyTile; ++j) {
    if (j >= n) {
      for (int d = 0; d < D; ++d) key_t[d * kKeyTile + j] = 0.f;
      continue;
    }
    const int t = kt + j;
    const int64_t block = seq.blocks[t / sh.block_size];
    const int row = t % sh.block_size;
    const T* kp = key_cache + block * sh.k_block_stride + kv_head * sh.k_head_stride +
                  row * sh.k_row_stride;
    const T* vp = value_cache + block * sh.v_block_stride + kv_head * sh.v_head_stride +
                  row * sh.v_row_stride;
    for (int d = 0; d < D; ++d) key[d] = load(kp[d]);
    angles_row(seq, t, half, cs);
    rotate(key, cs, sh.rotary_dim, sh.is_neox);
    for (int d = 0; d < D; ++d) key_t[d * kKeyTile + j] = key[d];
    for (int d = 0; d < D; ++d) vals[static_cast<size_t>(j) * D + d] = load(vp[d]);
  }
  for (int r = 0; r < rows; ++r) {
    float* s = scores + static_cast<size_t>(r) * kKeyTile;
    const float* qr = q + static_cast<size_t>(r) * D;
    for (int j = 0; j < kKeyTile; ++j) s[j] = 0.f;
    for (int d = 0; d < D; ++d) {
      const float qd = qr[d];
      const float* kd = key_t + d * kKeyTile;
      for (int j = 0; j < kKeyTile; ++j) s[j] += qd * kd[j];
    }
  }
}

inline void tile_values_generic(int D, const float* p, int rows, const float* vals, int n,
                                float* acc) {
  for (int r = 0; r < rows; ++r)
    for (int j = 0; j < n; ++j) {
      const float pj = p[static_cast<size_t>(r) * kKeyTile + j];
      const float* v = vals + static_cast<size_t>(j) * D;
      float* a = acc + static_cast<size_t>(r) * D;
      for (int d = 0; d < D; ++d) a[d] += pj * v[d];
    }
}

}  // namespace detail

// Attends rows [i0, i1) x (q heads of kv head `kv_head`) to keys [k0, k1) and folds
// the result into `state` (rows ordered query-major: row = (i - i0) * group + g).
template <typename T>
void paged_attend(const PagedShape& sh, const PagedSequence& seq, const T* query,
                  const T* key_cache, const T* value_cache, int kv_head, int i0, int i1,
                  int k0, int k1, SoftmaxState& state, Scratch& scratch) {
  const int D = sh.head_size, R = sh.rotary_dim, half = R / 2;
  const int group = sh.num_q_heads / sh.num_kv_heads;
  const int rows = (i1 - i0) * group;
  const int first_pos = seq.seq_len - seq.q_len;  // position of query 0
  // Causality: no row sees past the last row's position.
  k1 = std::min(k1, first_pos + i1);
  if (k1 <= k0) return;

  // Many rows (prefill, long extends): vectorised over rows, with bf16 dot products for
  // bf16 data where the CPU has them.
#if YARN_CPU_AVX512
  if (rows_tile::fits(sh, rows, 16))
    return rows_tile::attend<simd::F32x16, rows_tile::kBf16Dot && std::is_same_v<T, bf16>>(
        sh, seq, query, key_cache, value_cache, kv_head, i0, i1, k0, k1, state, scratch);
#endif
#if YARN_PAGED_AVX2
  if (rows_tile::fits(sh, rows, 8))
    return rows_tile::attend<simd::F32x8, false>(sh, seq, query, key_cache, value_cache, kv_head,
                                                 i0, i1, k0, k1, state, scratch);
#endif

  float* q = scratch.q.get(static_cast<size_t>(rows) * D);
  float* cs = scratch.cs.get(2 * half);
  for (int i = i0; i < i1; ++i) {
    detail::angles_row(seq, first_pos + i, half, cs);
    for (int g = 0; g < group; ++g) {
      const T* src = query + (seq.q_start + i) * sh.q_token_stride +
                     static_cast<int64_t>(kv_head * group + g) * sh.q_head_stride;
      float* dst = q + static_cast<size_t>((i - i0) * group + g) * D;
      for (int d = 0; d < D; ++d) dst[d] = load(src[d]);
      detail::rotate(dst, cs, R, sh.is_neox);
      // The logit scale folds into q once instead of into every score.
      for (int d = 0; d < D; ++d) dst[d] *= seq.logit_scale;
    }
  }

#if YARN_CPU_AVX512
  if (simd_tile::fits(sh, k0, 16))
    return simd_tile::attend<simd::F32x16>(sh, seq, q, rows, group, first_pos + i0, key_cache,
                                           value_cache, kv_head, k0, k1, state, scratch);
#endif
#if YARN_PAGED_AVX2
  if (simd_tile::fits(sh, k0, 8))
    return simd_tile::attend<simd::F32x8>(sh, seq, q, rows, group, first_pos + i0, key_cache,
                                          value_cache, kv_head, k0, k1, state, scratch);
#endif

  // The portable loop: GPT-J pairs, head sizes off the vector width, no AVX2.
  float* scores = scratch.scores.get(static_cast<size_t>(rows) * kKeyTile);
  float* key = scratch.key.get(D);
  float* key_t = scratch.key_t.get(static_cast<size_t>(D) * kKeyTile);
  float* vals = scratch.vals.get(static_cast<size_t>(kKeyTile) * D);
  const float neg_inf = -std::numeric_limits<float>::infinity();
  for (int kt = k0; kt < k1; kt += kKeyTile) {
    const int n = std::min(kKeyTile, k1 - kt);
    detail::tile_scores_generic(sh, seq, q, rows, key_cache, value_cache, kv_head, kt, n, scores,
                                cs, key, key_t, vals);
    // Online softmax: fold this tile into each row's running max and denominator,
    // leaving exp(score - max) in `scores` for the value pass.
    for (int r = 0; r < rows; ++r) {
      float* s = scores + static_cast<size_t>(r) * kKeyTile;
      const int limit = first_pos + i0 + r / group - kt;  // last visible key, tile-relative
      for (int j = std::max(0, std::min(n, limit + 1)); j < kKeyTile; ++j) s[j] = neg_inf;
      float tile_max = neg_inf;
      for (int j = 0; j < kKeyTile; ++j) tile_max = nan_max(tile_max, s[j]);
      if (tile_max == neg_inf) {  // every key of this tile is in this row's future
        std::fill(s, s + kKeyTile, 0.f);
        continue;
      }
      const float m_new = nan_max(state.m[r], tile_max);
      const float correction = std::exp(state.m[r] - m_new);  // 0 on the first tile
      detail::exp_shifted(s, m_new);
      float sum = 0.f;
      for (int j = 0; j < kKeyTile; ++j) sum += s[j];
      state.l[r] = state.l[r] * correction + sum;
      state.m[r] = m_new;
      float* acc = state.acc.data() + static_cast<size_t>(r) * D;
      for (int d = 0; d < D; ++d) acc[d] *= correction;
    }
    detail::tile_values_generic(D, scores, rows, vals, n, state.acc.data());
  }
}

}  // namespace yarn
