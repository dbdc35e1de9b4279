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
constexpr int kFastRows = 64;  // the register path hsums per (row, key): cheap for few rows

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

// exp of 8 lanes (Cephes-style: 2^n times a degree-6 polynomial on [-ln2/2, ln2/2]),
// with -inf (masked keys) mapped to exactly 0 and NaN kept NaN.
#if YARN_PAGED_AVX2
inline __m256 exp8(__m256 x) {
  const __m256 nan = _mm256_cmp_ps(x, x, _CMP_UNORD_Q);
  const __m256 masked = _mm256_cmp_ps(x, _mm256_set1_ps(-87.0f), _CMP_LT_OQ);
  x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.0f)), _mm256_set1_ps(88.0f));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.9875691500e-4f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
  p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n),
                                                       _mm256_set1_epi32(127)), 23);
  return _mm256_or_ps(nan, _mm256_andnot_ps(masked, _mm256_mul_ps(p, _mm256_castsi256_ps(e))));
}
#endif

// x[j] = exp(x[j] - shift) for j < kKeyTile.
inline void exp_shifted(float* x, float shift) {
#if YARN_PAGED_AVX2
  const __m256 s = _mm256_set1_ps(shift);
  for (int j = 0; j < kKeyTile; j += 8)
    _mm256_storeu_ps(x + j, exp8(_mm256_sub_ps(_mm256_loadu_ps(x + j), s)));
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


#if YARN_PAGED_AVX2
inline float hsum8(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// The decode-shaped hot path (few query rows, NeoX pairs, 8-aligned halves):
// each key is rotated in registers as it is loaded and scored against every
// row, so nothing is transposed and values are read straight from the cache.
template <typename T>
void tile_scores_avx2(const PagedShape& sh, const PagedSequence& seq, const float* q, int rows,
                      const T* key_cache, int kv_head, int kt, int n, float* scores,
                      float* cs_buf) {
  const int D = sh.head_size, half = sh.rotary_dim / 2;
  alignas(32) float rotated[1024];
  // The tile lies in one block (kt and block_size are multiples of kKeyTile).
  const T* tile_keys = key_cache + seq.blocks[kt / sh.block_size] * sh.k_block_stride +
                       kv_head * sh.k_head_stride + (kt % sh.block_size) * sh.k_row_stride;
  for (int j = 0; j < n; ++j) {
    const int t = kt + j;
    const T* kp = tile_keys + j * sh.k_row_stride;
    const float* fine = nullptr;
    const float* coarse = nullptr;
    if (seq.cos_sin != nullptr) {
      fine = fine_row(seq, t, half);
      coarse = coarse_row(seq, t, half);
    } else {
      angles_row(seq, t, half, cs_buf);
    }
    for (int c = 0; c < half; c += 8) {
      const __m256 k1 = avx2::load8(kp + c), k2 = avx2::load8(kp + half + c);
      __m256 co, si;
      if (fine != nullptr) {
        const __m256 cc = _mm256_loadu_ps(coarse + c), cs_ = _mm256_loadu_ps(coarse + half + c);
        const __m256 fc = _mm256_loadu_ps(fine + c), fs = _mm256_loadu_ps(fine + half + c);
        co = _mm256_fmsub_ps(cc, fc, _mm256_mul_ps(cs_, fs));
        si = _mm256_fmadd_ps(cs_, fc, _mm256_mul_ps(cc, fs));
      } else {
        co = _mm256_loadu_ps(cs_buf + c);
        si = _mm256_loadu_ps(cs_buf + half + c);
      }
      _mm256_store_ps(rotated + c, _mm256_fmsub_ps(k1, co, _mm256_mul_ps(k2, si)));
      _mm256_store_ps(rotated + half + c, _mm256_fmadd_ps(k2, co, _mm256_mul_ps(k1, si)));
    }
    for (int c = 2 * half; c < D; c += 8) _mm256_store_ps(rotated + c, avx2::load8(kp + c));
    for (int r = 0; r < rows; ++r) {
      const float* qr = q + static_cast<size_t>(r) * D;
      __m256 acc = _mm256_mul_ps(_mm256_loadu_ps(qr), _mm256_load_ps(rotated));
      for (int c = 8; c < D; c += 8)
        acc = _mm256_fmadd_ps(_mm256_loadu_ps(qr + c), _mm256_load_ps(rotated + c), acc);
      scores[static_cast<size_t>(r) * kKeyTile + j] = hsum8(acc);
    }
  }
}

// acc[r] += sum_j p[r][j] * v_j over the n keys of the tile.
template <typename T>
void tile_values_avx2(const PagedShape& sh, const PagedSequence& seq, const float* p, int rows,
                      const T* value_cache, int kv_head, int kt, int n, float* acc) {
  const int D = sh.head_size;
  const T* tile_values = value_cache + seq.blocks[kt / sh.block_size] * sh.v_block_stride +
                         kv_head * sh.v_head_stride + (kt % sh.block_size) * sh.v_row_stride;
  for (int j = 0; j < n; ++j) {
    const T* vp = tile_values + j * sh.v_row_stride;
    for (int c = 0; c < D; c += 8) {
      const __m256 v = avx2::load8(vp + c);
      for (int r = 0; r < rows; ++r) {
        float* a = acc + static_cast<size_t>(r) * D + c;
        _mm256_storeu_ps(a, _mm256_fmadd_ps(_mm256_set1_ps(p[static_cast<size_t>(r) * kKeyTile + j]),
                                            v, _mm256_loadu_ps(a)));
      }
    }
  }
}
#endif

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
                  int k0, int k1, SoftmaxState& state) {
  const int D = sh.head_size, R = sh.rotary_dim, half = R / 2;
  const int group = sh.num_q_heads / sh.num_kv_heads;
  const int rows = (i1 - i0) * group;
  const int first_pos = seq.seq_len - seq.q_len;  // position of query 0
  // Causality: no row sees past the last row's position.
  k1 = std::min(k1, first_pos + i1);
  if (k1 <= k0) return;

  std::vector<float> q(static_cast<size_t>(rows) * D), cs(2 * half);
  for (int i = i0; i < i1; ++i) {
    detail::angles_row(seq, first_pos + i, half, cs.data());
    for (int g = 0; g < group; ++g) {
      const T* src = query + (seq.q_start + i) * sh.q_token_stride +
                     static_cast<int64_t>(kv_head * group + g) * sh.q_head_stride;
      float* dst = q.data() + static_cast<size_t>((i - i0) * group + g) * D;
      for (int d = 0; d < D; ++d) dst[d] = load(src[d]);
      detail::rotate(dst, cs.data(), R, sh.is_neox);
      // The logit scale folds into q once instead of into every score.
      for (int d = 0; d < D; ++d) dst[d] *= seq.logit_scale;
    }
  }

#if YARN_PAGED_AVX2
  const bool fast = sh.is_neox && half % 8 == 0 && D % 8 == 0 && D <= 1024 &&
                    rows <= kFastRows && sh.block_size % kKeyTile == 0 && k0 % kKeyTile == 0;
#else
  const bool fast = false;
#endif
  std::vector<float> scores(static_cast<size_t>(rows) * kKeyTile);
  std::vector<float> key, key_t, vals;
  if (!fast) {
    key.resize(D);
    key_t.resize(static_cast<size_t>(D) * kKeyTile);
    vals.resize(static_cast<size_t>(kKeyTile) * D);
  }
  const float neg_inf = -std::numeric_limits<float>::infinity();

  for (int kt = k0; kt < k1; kt += kKeyTile) {
    const int n = std::min(kKeyTile, k1 - kt);
#if YARN_PAGED_AVX2
    if (fast)
      detail::tile_scores_avx2(sh, seq, q.data(), rows, key_cache, kv_head, kt, n, scores.data(),
                               cs.data());
#endif
    if (!fast)
      detail::tile_scores_generic(sh, seq, q.data(), rows, key_cache, value_cache, kv_head, kt, n,
                                  scores.data(), cs.data(), key.data(), key_t.data(),
                                  vals.data());
    // Online softmax: fold this tile into each row's running max and denominator,
    // leaving exp(score - max) in `scores` for the value pass.
    for (int r = 0; r < rows; ++r) {
      float* s = scores.data() + static_cast<size_t>(r) * kKeyTile;
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
#if YARN_PAGED_AVX2
    if (fast)
      detail::tile_values_avx2(sh, seq, scores.data(), rows, value_cache, kv_head, kt, n,
                               state.acc.data());
#endif
    if (!fast) detail::tile_values_generic(D, scores.data(), rows, vals.data(), n,
                                           state.acc.data());
  }
}

}  // namespace yarn
