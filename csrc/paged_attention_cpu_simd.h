// The vectorised tile loop of the CPU paged attention kernel, written once over a
// vector width: simd::F32x8 (AVX2) and simd::F32x16 (AVX-512). A part of
// paged_attention_cpu_kernel.h, which includes it after the definitions it uses.
//
// Per tile of kKeyTile keys of one kv head, for every query row of the item:
//   1. keys are loaded and rotated into `rotated` [kKeyTile, D] fp32, each angle
//      composed from the table: the tile's one coarse row (tiles start at multiples
//      of kAngleStride == kKeyTile) times the fine row of the key's offset in the tile;
//   2. each row scores W keys at once in W accumulators, finished together by
//      sum_lanes (one transpose-add in place of W horizontal sums). A decode's few rows
//      (rotate_score) instead take each key rotated in registers against all rows at
//      once, and sum_lanes finishes their partial products;
//   3. the online softmax of each row, vectorised over the tile;
//   4. values: rows' accumulators stay in registers over the tile's keys (NV = D / W
//      vectors a row, fixed at compile time), not loaded and stored once per key.
// Reduction orders differ between the widths (and from the generic path), so their
// results agree to rounding, not bit for bit; exp is the same lane for lane.
#pragma once

#include <type_traits>

namespace yarn {
namespace simd_tile {

constexpr int kSpan = 128;  // keys per online-softmax step: its fixed cost is per step

// Touches the next span's cache rows ahead of use, one row per 4 KiB page (into L2): a
// context of a few thousand keys streams from L3 or memory, and the hardware prefetchers
// stop at each page, whose first touch also costs a TLB walk. One row a page gave most
// of the gain of every row (11-17% on a cold cache) at no cost on a warm one.
template <typename T>
inline void prefetch_rows(const T* const* rows, int n, int D) {
  const int row_bytes = D * static_cast<int>(sizeof(T));
  const int every = std::max(1, 4096 / row_bytes);
  for (int j = 0; j < n; j += every)
    for (int b = 0; b < row_bytes; b += 64)
      _mm_prefetch(reinterpret_cast<const char*>(rows[j]) + b, _MM_HINT_T1);
}

// out[0, D) = x turned by the angle row [cos | sin] of `half` NeoX pairs (Back: by minus
// that angle), the channels past the rotary dims copied; half and D multiples of S::W.
// One vector of NeoX pairs (x1, x2) turned by the angle whose cos and sin are co and si
// (Back: by minus it), into (y1, y2): the rotation, written once for turn and rotate_score.
template <class S, bool Back>
inline void turn_pair(typename S::V x1, typename S::V x2, typename S::V co, typename S::V si,
                      typename S::V& y1, typename S::V& y2) {
  y1 = Back ? S::fmadd(x1, co, S::mul(x2, si)) : S::fmsub(x1, co, S::mul(x2, si));
  y2 = Back ? S::fmsub(x2, co, S::mul(x1, si)) : S::fmadd(x2, co, S::mul(x1, si));
}

template <class S, bool Back, typename T>
inline void turn(const T* x, const float* angle, int half, int D, float* out) {
  using V = typename S::V;
  for (int c = 0; c < half; c += S::W) {
    V y1, y2;
    turn_pair<S, Back>(S::load(x + c), S::load(x + half + c), S::load(angle + c),
                       S::load(angle + half + c), y1, y2);
    S::store(out + c, y1);
    S::store(out + half + c, y2);
  }
  for (int c = 2 * half; c < D; c += S::W) S::store(out + c, S::load(x + c));
}

// rotated[j] = the key at rows[j] turned by angle (kt + j) - (its coarse part), j < n:
// the fine row j of the table, or with no table the whole exact angle (fp32, as the
// reference forms it) while the queries are not turned back at all.
template <class S, typename T>
void rotate_keys(const PagedShape& sh, const PagedSequence& seq, const T* const* rows, int kt,
                 int n, float* rotated, float* cs) {
  const int D = sh.head_size, half = sh.rotary_dim / 2;
  for (int j = 0; j < n; ++j) {
    const T* kp = rows[j];
    float* out = rotated + static_cast<size_t>(j) * D;
    const float* angle = cs;
    if (seq.cos_sin != nullptr)
      angle = seq.cos_sin + static_cast<int64_t>(j) * 2 * half;  // fine row of kt + j
    else
      detail::angles_row(seq, kt + j, half, cs);
    turn<S, false>(kp, angle, half, D, out);
  }
}

// turned[r] = q_r turned back by the coarse angle of position kt (a multiple of
// kAngleStride), for `rows` rows: then turned[r] . (k_t turned by the fine angle of t)
// is q_r . (k_t turned by the whole angle of t), as 2-D rotations compose, and keys
// need no per-key angle composition.
template <class S>
void turn_back(const PagedShape& sh, const PagedSequence& seq, const float* q, int rows, int kt,
               float* turned) {
  const int D = sh.head_size, half = sh.rotary_dim / 2;
  const float* coarse = detail::coarse_row(seq, kt, half);
  for (int r = 0; r < rows; ++r) {
    const float* x = q + static_cast<size_t>(r) * D;
    float* out = turned + static_cast<size_t>(r) * D;
    turn<S, true>(x, coarse, half, D, out);
  }
}

// scores[r * kSpan + k] = q_r . rotated_k for the W keys at `rotated`, every row. NV = D / W
// when compiled for it (0: D at run time): with D known, the W key rows are fixed offsets
// from one pointer, not W pointers that spill the integer registers.
template <class S, int NV>
void score_keys(const float* q, int rows, int head_size, const float* rotated, float* scores) {
  using V = typename S::V;
  constexpr int W = S::W;
  const int D = NV > 0 ? NV * W : head_size;
  for (int r = 0; r < rows; ++r) {
    const float* qr = q + static_cast<size_t>(r) * D;
    V acc[W];
    for (int k = 0; k < W; ++k) acc[k] = S::zero();
    for (int c = 0; c < D; c += W) {
      const V x = S::load(qr + c);
      for (int k = 0; k < W; ++k) acc[k] = S::fmadd(x, S::load(rotated + k * D + c), acc[k]);
    }
    S::store(scores + static_cast<size_t>(r) * kSpan, S::sum_lanes(acc));
  }
}

// Folds one row's span of scores s[0, width) (keys from `valid` on are masked; width a
// multiple of W) into its running max m and sum l; leaves exp(s - m) in s and returns
// the factor by which the row's accumulator must be scaled. A NaN score makes the row
// NaN, as in the reference.
template <class S>
float softmax_span(float* s, int valid, int width, float& m, float& l) {
  using V = typename S::V;
  constexpr int W = S::W;
  const float neg_inf = -std::numeric_limits<float>::infinity();
  for (int j = std::max(valid, 0); j < width; ++j) s[j] = neg_inf;
  V top = S::load(s);
  bool nan = S::any_nan(top);
  for (int j = W; j < width; j += W) {
    const V x = S::load(s + j);
    nan |= S::any_nan(x);
    top = S::max(top, x);
  }
  const float span_max = nan ? std::numeric_limits<float>::quiet_NaN() : S::hmax(top);
  if (span_max == neg_inf) {  // every key of this span is in this row's future
    std::fill(s, s + width, 0.f);
    return 1.f;
  }
  const float m_new = nan_max(m, span_max);
  const float correction = std::exp(m - m_new);  // 0 on the first span
  const V shift = S::set1(m_new);
  V sum = S::zero();
  for (int j = 0; j < width; j += W) {
    const V p = S::exp(S::sub(S::load(s + j), shift));
    S::store(s + j, p);
    sum = S::add(sum, p);
  }
  l = l * correction + S::hsum(sum);
  m = m_new;
  return correction;
}

// acc[r] = acc[r] * corr[r] + sum_j p[r][j] v_j for exactly R rows, NV = D / W vectors a
// row: the rows' accumulators stay in registers while the n values at vrows stream by.
template <class S, int NV, int R, typename T>
void add_values_rows(const float* p, const float* corr, const T* const* vrows, int n,
                     float* acc) {
  using V = typename S::V;
  constexpr int W = S::W, D = NV * W;
  V a[R][NV];
  for (int i = 0; i < R; ++i) {
    const V c = S::set1(corr[i]);
    for (int v = 0; v < NV; ++v) a[i][v] = S::mul(S::load(acc + i * D + v * W), c);
  }
  for (int j = 0; j < n; ++j) {
    V pj[R];
    for (int i = 0; i < R; ++i) pj[i] = S::set1(p[static_cast<size_t>(i) * kSpan + j]);
    for (int v = 0; v < NV; ++v) {
      const V x = S::load(vrows[j] + v * W);
      for (int i = 0; i < R; ++i) a[i][v] = S::fmadd(pj[i], x, a[i][v]);
    }
  }
  for (int i = 0; i < R; ++i)
    for (int v = 0; v < NV; ++v) S::store(acc + i * D + v * W, a[i][v]);
}

// add_values_rows for any `rows` < R + 1, picked at run time.
template <class S, int NV, int R, typename T>
void add_values_few(int rows, const float* p, const float* corr, const T* const* vrows, int n,
                    float* acc) {
  if constexpr (R > 0) {
    if (rows == R) return add_values_rows<S, NV, R>(p, corr, vrows, n, acc);
    add_values_few<S, NV, R - 1>(rows, p, corr, vrows, n, acc);
  }
}

// add_values_rows over all rows, RC at a time (as many as half the registers hold).
template <class S, int NV, typename T>
void add_values(const float* p, const float* corr, int rows, const T* const* vrows, int n,
                float* acc) {
  constexpr int RC = std::max(1, S::kRegisters / 2 / NV), D = NV * S::W;
  int r = 0;
  for (; r + RC <= rows; r += RC)
    add_values_rows<S, NV, RC>(p + static_cast<size_t>(r) * kSpan, corr + r, vrows, n,
                               acc + static_cast<size_t>(r) * D);
  add_values_few<S, NV, RC - 1>(rows - r, p + static_cast<size_t>(r) * kSpan, corr + r, vrows,
                                n, acc + static_cast<size_t>(r) * D);
}

// add_values for a head size with no compiled NV: accumulators in memory.
template <class S, typename T>
void add_values_any(int D, const float* p, const float* corr, int rows, const T* const* vrows,
                    int n, float* acc) {
  constexpr int W = S::W;
  for (int r = 0; r < rows; ++r) {
    float* a = acc + static_cast<size_t>(r) * D;
    for (int c = 0; c < D; c += W) S::store(a + c, S::mul(S::load(a + c), S::set1(corr[r])));
  }
  for (int j = 0; j < n; ++j)
    for (int r = 0; r < rows; ++r) {
      float* a = acc + static_cast<size_t>(r) * D;
      const auto pj = S::set1(p[static_cast<size_t>(r) * kSpan + j]);
      for (int c = 0; c < D; c += W)
        S::store(a + c, S::fmadd(pj, S::load(vrows[j] + c), S::load(a + c)));
    }
}

// Rows whose q stays in registers through rotate_score (R x NV in half the registers; at 8
// lanes, 16 registers leave no room for a row of D = 64 and the rotated key beside it).
template <class S, int NV>
constexpr int kFusedRows =
    NV > 0 && NV % 2 == 0 && S::kRegisters >= 32 ? std::min(4, S::kRegisters / 2 / NV) : 0;

// scores[r * kSpan + j] = q_r . (key j turned by fine angle j) for j < m <= kAngleStride and
// exactly R rows, the keys at rows[j] and the table's fine rows, every channel rotary
// (half = D / 2: the vector pairs known at compile time, so the rotated key stays in
// registers): each key is rotated once and scored against every row at once, where
// rotate_keys + score_keys store it and load it back once per row (decode is bound by
// loads). Each row's W-lane partial products go to `part` [R][kAngleStride][W], summed W
// keys at a time by sum_lanes.
template <class S, int NV, int R, typename T>
void rotate_score(const PagedSequence& seq, const float* q, const T* const* rows, int m,
                  float* part, float* scores) {
  using V = typename S::V;
  constexpr int W = S::W, D = NV * W, H = NV / 2, half = D / 2;
  V qv[R][NV];
  for (int i = 0; i < R; ++i)
    for (int v = 0; v < NV; ++v) qv[i][v] = S::load(q + static_cast<size_t>(i) * D + v * W);
  for (int j = 0; j < m; ++j) {
    const float* angle = seq.cos_sin + static_cast<int64_t>(j) * 2 * half;  // fine row j
    const T* kp = rows[j];
    V r[NV];
    for (int c = 0; c < H; ++c)
      turn_pair<S, false>(S::load(kp + c * W), S::load(kp + half + c * W),
                          S::load(angle + c * W), S::load(angle + half + c * W), r[c], r[H + c]);
    for (int i = 0; i < R; ++i) {
      V acc = S::mul(qv[i][0], r[0]);
      for (int v = 1; v < NV; ++v) acc = S::fmadd(qv[i][v], r[v], acc);
      S::store(part + (static_cast<size_t>(i) * kAngleStride + j) * W, acc);
    }
  }
  for (int i = 0; i < R; ++i)
    for (int g = 0; g < m; g += W) {
      V acc[W];
      for (int k = 0; k < W; ++k)
        acc[k] = S::load(part + (static_cast<size_t>(i) * kAngleStride + g + k) * W);
      S::store(scores + static_cast<size_t>(i) * kSpan + g, S::sum_lanes(acc));
    }
}

// rotate_score for any `rows` <= R, picked at run time.
template <class S, int NV, int R, typename T>
void rotate_score_few(int rows, const PagedSequence& seq, const float* q, const T* const* krows,
                      int m, float* part, float* scores) {
  if constexpr (R > 0) {
    if (rows == R) return rotate_score<S, NV, R>(seq, q, krows, m, part, scores);
    rotate_score_few<S, NV, R - 1>(rows, seq, q, krows, m, part, scores);
  }
}

// True if the vectorised loop of width W serves this shape from key k0 on.
inline bool fits(const PagedShape& sh, int k0, int W) {
  const int half = sh.rotary_dim / 2;
  return sh.is_neox && half % W == 0 && sh.head_size % W == 0 && k0 % kAngleStride == 0;
}

// attend for NV = D / W vectors a row, fixed at compile time (0: any D, at run time).
template <class S, int NV, typename T>
void attend_nv(const PagedShape& sh, const PagedSequence& seq, const float* q, int rows,
               int group, int row0_pos, const T* key_cache, const T* value_cache, int kv_head,
               int k0, int k1, SoftmaxState& state, Scratch& scratch) {
  constexpr int W = S::W;
  const int D = NV > 0 ? NV * W : sh.head_size;
  // a decode's few rows (a group) with the step's angle table, all channels rotary: keys
  // rotated in registers
  const bool fused = seq.cos_sin != nullptr && rows <= kFusedRows<S, NV> && sh.rotary_dim == D;
  // rotate_keys' [kAngleStride][D] keys, or rotate_score's [rows][kAngleStride][W] partials
  float* rotated = scratch.rotated.get(static_cast<size_t>(kAngleStride) *
                                       std::max(D, kFusedRows<S, NV> * W));
  float* turned = scratch.turned.get(static_cast<size_t>(rows) * D);
  float* scores = scratch.scores.get(static_cast<size_t>(rows) * kSpan);
  float* corr = scratch.corr.get(rows);
  float* cs = scratch.cs.get(sh.rotary_dim);
  detail::KvRows<T, kSpan> kv(sh, seq, key_cache, value_cache, kv_head);
  kv.load_next(k0, std::min(kSpan, k1 - k0));
  kv.advance();
  for (int kt = k0; kt < k1; kt += kSpan) {
    const int n = std::min(kSpan, k1 - kt);
    const int n_next = std::max(0, std::min(kSpan, k1 - kt - kSpan));
    kv.load_next(kt + kSpan, n_next);
    const T* const* krows = kv.k;
    const T* const* vrows = kv.v;
    const T* const* knext = kv.k_next;
    const T* const* vnext = kv.v_next;
    for (int a = 0; a < n; a += kAngleStride) {  // one coarse angle row at a time
      const int m = std::min(kAngleStride, n - a);
      const float* qa = q;
      if (seq.cos_sin != nullptr) {
        turn_back<S>(sh, seq, q, rows, kt + a, turned);
        qa = turned;
      }
      prefetch_rows(knext + a, std::max(0, std::min(m, n_next - a)), D);
      if (fused) {
        rotate_score_few<S, NV, kFusedRows<S, NV>>(rows, seq, qa, krows + a, m, rotated,
                                                   scores + a);
        continue;
      }
      rotate_keys<S>(sh, seq, krows + a, kt + a, m, rotated, cs);
      for (int g = 0; g < m; g += W)
        score_keys<S, NV>(qa, rows, D, rotated + static_cast<size_t>(g) * D, scores + a + g);
    }
    const int width = (n + W - 1) / W * W;
    for (int r = 0; r < rows; ++r)
      corr[r] = softmax_span<S>(scores + static_cast<size_t>(r) * kSpan,
                                        std::min(n, row0_pos + r / group - kt + 1), width,
                                        state.m[r], state.l[r]);
    prefetch_rows(vnext, n_next, D);
    if constexpr (NV > 0)
      add_values<S, NV>(scores, corr, rows, vrows, n, state.acc.data());
    else
      add_values_any<S>(D, scores, corr, rows, vrows, n, state.acc.data());
    kv.advance();
  }
}

// Attends `rows` prepared query rows q [rows, D] (row r at position row0_pos + r / group)
// to keys [k0, k1) of one kv head, folding the result into `state`.
template <class S, typename T>
void attend(const PagedShape& sh, const PagedSequence& seq, const float* q, int rows, int group,
            int row0_pos, const T* key_cache, const T* value_cache, int kv_head, int k0, int k1,
            SoftmaxState& state, Scratch& scratch) {
  const auto run = [&](auto nv) {
    attend_nv<S, decltype(nv)::value>(sh, seq, q, rows, group, row0_pos, key_cache, value_cache,
                                      kv_head, k0, k1, state, scratch);
  };
  switch (sh.head_size / S::W) {
    case 2: return run(std::integral_constant<int, 2>{});
    case 4: return run(std::integral_constant<int, 4>{});
    case 8: return run(std::integral_constant<int, 8>{});
    case 16: return run(std::integral_constant<int, 16>{});
    default: return run(std::integral_constant<int, 0>{});
  }
}

}  // namespace simd_tile
}  // namespace yarn
