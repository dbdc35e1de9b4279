// The many-rows tile loop of the CPU paged attention kernel (prefill and long extends),
// vectorised over *query rows* rather than keys: a part of paged_attention_cpu_kernel.h,
// which includes it after the definitions it uses.
//
// A work item's M rows (its tokens x the q heads of one kv head: GQA shares each key
// and value among the group, never repeated) are held transposed, qt [D][Mp] (Mp = M
// rounded up to the vector width), rotated once at their own positions. Per tile of
// kKeys keys, loaded from the paged cache and rotated at the sequence's scale as they
// are loaded (each key's angle composed from the table: coarse row x fine row):
//   1. st [kKeys][Mp] = keys . qt: a register-blocked outer product, each key channel
//      broadcast against RV row vectors, so nothing is reduced across lanes;
//   2. the online softmax of every row at once, vectorised over rows (the causal mask,
//      the tile's past-the-end keys, only on the tiles that need it);
//   3. ot [D][Mp] += values^T . p, the same outer product with values broadcast.
// With AVX512-BF16 and bf16 data, both products are vdpbf16ps over pairs (of channels
// for the scores, of keys for the values): rotated q and k and the probabilities are
// rounded to bf16, as vLLM's own kernels round post-RoPE q and k and its probabilities.
#pragma once

#if defined(__AVX512BF16__) && YARN_CPU_AVX512
#define YARN_CPU_AVX512_BF16 1
#endif

namespace yarn {
namespace rows_tile {

#if YARN_CPU_AVX512_BF16
constexpr bool kBf16Dot = true;  // vdpbf16ps: bf16 pairs multiplied, summed in fp32
#else
constexpr bool kBf16Dot = false;
#endif

// Keys per tile: the values' product runs kKeys deep, so its fixed cost per call (the
// accumulators loaded, scaled and stored) is spread over 64 steps (2% faster than 32).
constexpr int kKeys = 64;

// Rows per item from which the row-vectorised loop beats the key-vectorised one.
constexpr int kMinRows = 32;

// row[0, 2 half) = [cos | sin] of position t, composed from the table (coarse x fine)
// or, without one, formed from inv_freq (fp32 angle, as the reference forms it).
template <class S>
inline void angle_of(const PagedSequence& seq, int t, int half, float* row) {
  if (seq.cos_sin == nullptr) return detail::angles_row(seq, t, half, row);
  const float* f = detail::fine_row(seq, t, half);
  const float* c = detail::coarse_row(seq, t, half);
  for (int j = 0; j < half; j += S::W) {
    const auto fc = S::load(f + j), fs = S::load(f + half + j);
    const auto cc = S::load(c + j), cs = S::load(c + half + j);
    S::store(row + j, S::fmsub(cc, fc, S::mul(cs, fs)));
    S::store(row + half + j, S::fmadd(cs, fc, S::mul(cc, fs)));
  }
}

// True if the row-vectorised loop of width W serves this shape (NeoX pairs in whole vectors).
inline bool fits(const PagedShape& sh, int rows, int W) {
  return rows >= kMinRows && sh.is_neox && (sh.rotary_dim / 2) % W == 0 &&
         sh.head_size % W == 0;
}

// Loaded once, used KB times: without this GCC folds the load into each of the KB FMAs,
// and the loop is bound by loads (KB x RV of them per depth step instead of RV).
template <typename V>
inline void keep_in_register(V& x) { __asm__("" : "+v"(x)); }

// c[k][v] (+)= sum over depth d of a[k][d] * b[d][v], for KB rows k of a (a + k * a_k
// + d * a_d, broadcast) and RV vectors v of b (b + d * ldb + v * W, loaded): the one
// outer-product micro-kernel of both products, no lane crossing another. With
// `scale_rows`, c is read first and scaled per row vector (the online softmax's correction).
// Kept out of line: inlined into outer_all's loops, GCC spilled its row vectors to the
// stack (a prefill 20% slower).
template <class S, int KB, int RV>
__attribute__((noinline)) void outer(const float* a, int a_k, int a_d, const float* b, int ldb,
                                     int depth, float* c, int ldc, const float* scale_rows) {
  using V = typename S::V;
  V acc[KB][RV];
  for (int k = 0; k < KB; ++k)
    for (int v = 0; v < RV; ++v)
      acc[k][v] = scale_rows ? S::mul(S::load(c + k * ldc + v * S::W), S::load(scale_rows + v * S::W))
                             : S::zero();
  for (int d = 0; d < depth; ++d) {
    V x[RV];
    for (int v = 0; v < RV; ++v) {
      x[v] = S::load(b + static_cast<size_t>(d) * ldb + v * S::W);
      keep_in_register(x[v]);
    }
    for (int k = 0; k < KB; ++k) {
      const V y = S::set1(a[k * a_k + static_cast<size_t>(d) * a_d]);
      for (int v = 0; v < RV; ++v) acc[k][v] = S::fmadd(y, x[v], acc[k][v]);
    }
  }
  for (int k = 0; k < KB; ++k)
    for (int v = 0; v < RV; ++v) S::store(c + k * ldc + v * S::W, acc[k][v]);
}

#if YARN_CPU_AVX512_BF16
// outer on bf16 pairs: a and b hold 32-bit words of two bf16 each, and one vdpbf16ps
// takes two depth steps (a pair) of 16 lanes.
// Out of line, as outer.
template <int KB, int RV>
__attribute__((noinline)) void outer_bf16(const uint32_t* a, int a_k, int a_d, const uint32_t* b,
                                          int ldb, int pairs, float* c, int ldc,
                                          const float* scale_rows) {
  __m512 acc[KB][RV];
  for (int k = 0; k < KB; ++k)
    for (int v = 0; v < RV; ++v)
      acc[k][v] = scale_rows ? _mm512_mul_ps(_mm512_loadu_ps(c + k * ldc + v * 16),
                                             _mm512_loadu_ps(scale_rows + v * 16))
                             : _mm512_setzero_ps();
  for (int p = 0; p < pairs; ++p) {
    __m512bh x[RV];
    for (int v = 0; v < RV; ++v) {
      x[v] = (__m512bh)_mm512_loadu_si512(b + static_cast<size_t>(p) * ldb + v * 16);
      keep_in_register(x[v]);
    }
    for (int k = 0; k < KB; ++k) {
      const auto word = static_cast<int>(a[k * a_k + static_cast<size_t>(p) * a_d]);
      const __m512bh y = (__m512bh)_mm512_set1_epi32(word);
      for (int v = 0; v < RV; ++v) acc[k][v] = _mm512_dpbf16_ps(acc[k][v], y, x[v]);
    }
  }
  for (int k = 0; k < KB; ++k)
    for (int v = 0; v < RV; ++v) _mm512_storeu_ps(c + k * ldc + v * 16, acc[k][v]);
}

// 16 words (lo[i] | hi[i] << 16) from two vectors of fp32, each rounded to bf16.
inline __m512i pair_words(__m512 lo, __m512 hi) {
  const __m512i a = _mm512_cvtepu16_epi32((__m256i)_mm512_cvtneps_pbh(lo));
  const __m512i b = _mm512_cvtepu16_epi32((__m256i)_mm512_cvtneps_pbh(hi));
  return _mm512_or_si512(a, _mm512_slli_epi32(b, 16));
}
#endif

// Which part of a tile the causal mask leaves to compute: keys kt.. of the tile against
// rows whose row r sits at position pos0 + r / group. Rows past `depth_of`'s vector block
// see no later key; a key block sees no row before `first_vec`'s.
struct Causal {
  int kt, pos0, group, W;
  // first row vector that sees key kt + k (the rows before it are masked for it)
  int first_vec(int k, int vecs) const {
    return std::min(vecs, std::max(0, (kt + k - pos0) * group) / W);
  }
  // keys of the tile (of `depth` in units of `unit` keys) that rows [0, (v + R) W) see
  int depth_of(int v, int R, int depth, int unit) const {
    const int last_row = (v + R) * W - 1;
    const int keys = std::max(0, pos0 + last_row / group - kt + 1);
    return std::min(depth, (keys + unit - 1) / unit);
  }
};

// c[rows][vecs] (+)= a . b over all `rows` rows of a (KB at a time; a multiple of KB) and
// `vecs` vectors of b (RV at a time, the rest one at a time). With `causal`, the blocks the
// mask hides are skipped: a's rows are keys (scores) and start at their first seeing row
// vector, or the depth is keys (values, `unit` keys a step) and stops at the block's last
// seen key; the skipped scores are masked afterwards, the skipped values have p = 0.
template <class S, bool Bf16, int KB, int RV, typename A>
void outer_all(const A* a, int a_k, int a_d, int rows, const A* b, int ldb, int depth, int vecs,
               float* c, int ldc, const float* scale_rows, const Causal* keys_as_rows = nullptr,
               const Causal* keys_as_depth = nullptr, int unit = 1) {
  constexpr int W = S::W;
  for (int k = 0; k < rows; k += KB) {
    const A* ak = a + static_cast<size_t>(k) * a_k;
    float* ck = c + static_cast<size_t>(k) * ldc;
    const auto run = [&](auto rv, int v) {
      constexpr int R = decltype(rv)::value;
      const float* sv = scale_rows ? scale_rows + v * W : nullptr;
      const int d = keys_as_depth ? keys_as_depth->depth_of(v, R, depth, unit) : depth;
#if YARN_CPU_AVX512_BF16
      if constexpr (Bf16)
        return outer_bf16<KB, R>(ak, a_k, a_d, b + v * W, ldb, d, ck + v * W, ldc, sv);
      else
#endif
        return outer<S, KB, R>(ak, a_k, a_d, b + v * W, ldb, d, ck + v * W, ldc, sv);
    };
    int v = keys_as_rows ? keys_as_rows->first_vec(k, vecs) : 0;
    for (; v + RV <= vecs; v += RV) run(std::integral_constant<int, RV>{}, v);
    for (; v < vecs; ++v) run(std::integral_constant<int, 1>{}, v);
  }
}

// e^(s - m) for s <= m with m finite (a row's running max): -inf gives 0, NaN stays NaN.
template <class S>
inline typename S::V exp_below(typename S::V s, typename S::V m) {
  return S::exp(S::sub(s, m));
}
#if YARN_CPU_AVX512
// At 16 lanes, for a third fewer instructions: 2^t with t = (s - m) log2(e) split as
// n + f, |f| <= 1/2; 2^f by Cephes' exp2f polynomial (relative error 2e-7, as S::exp's)
// and 2^n by vscalefps, which needs no clamp above (t <= 0) nor integer steps.
template <>
inline __m512 exp_below<simd::F32x16>(__m512 s, __m512 m) {
  __m512 t = _mm512_mul_ps(_mm512_sub_ps(s, m), _mm512_set1_ps(1.44269504088896341f));
  t = _mm512_max_ps(_mm512_set1_ps(-160.f), t);  // -inf to -160 (2^-160 is 0); a NaN stays
  const __m512 n = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_sub_ps(t, n);
  __m512 p = _mm512_set1_ps(1.535336188319500e-4f);
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.339887440266574e-3f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(9.618437357674640e-3f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(5.550332471162809e-2f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(2.402264791363012e-1f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(6.931472028550421e-1f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.f));
  return _mm512_scalef_ps(p, n);
}
#endif

// The register blocking of each width: KB broadcasts x RV loaded row vectors, KB * RV
// accumulators (24 of 32 registers at 16 lanes, 8 of 16 at 8).
template <class S> struct Blocking { static constexpr int KB = 4, RV = 4; };
#if YARN_PAGED_AVX2
template <> struct Blocking<simd::F32x8> { static constexpr int KB = 2, RV = 4; };
#endif

// Attends rows [i0, i1) x (the q heads of kv head `kv_head`) to keys [k0, k1), folding
// the result into `state` (row = (i - i0) * group + g, as paged_attend orders them).
// Bf16: whether the products run as bf16 pairs (T is bf16 and the CPU has AVX512-BF16).
template <class S, bool Bf16, typename T>
void attend(const PagedShape& sh, const PagedSequence& seq, const T* query, const T* key_cache,
            const T* value_cache, int kv_head, int i0, int i1, int k0, int k1,
            SoftmaxState& state, Scratch& scratch) {
  using V = typename S::V;
  constexpr int W = S::W, KB = Blocking<S>::KB, RV = Blocking<S>::RV;
  static_assert(kKeys % KB == 0 && kKeys % 2 == 0, "whole key blocks and pairs per tile");
  const int D = sh.head_size, half = sh.rotary_dim / 2;
  const int group = sh.num_q_heads / sh.num_kv_heads;
  const int M = (i1 - i0) * group, vecs = (M + W - 1) / W, Mp = vecs * W;
  const int first_pos = seq.seq_len - seq.q_len;
  const int pos0 = first_pos + i0;        // position of row 0 (rows go up by 1 per token)
  k1 = std::min(k1, first_pos + i1);      // causality: nothing past the last row
  const float neg_inf = -std::numeric_limits<float>::infinity();

  float* qt = scratch.q.get(static_cast<size_t>(D) * Mp);
  float* ot = scratch.turned.get(static_cast<size_t>(D) * Mp);
  float* st = scratch.scores.get(static_cast<size_t>(kKeys) * Mp);
  float* keys = scratch.rotated.get(static_cast<size_t>(kKeys) * D);
  float* vals = scratch.vals.get(static_cast<size_t>(kKeys) * D);
  float* cs = scratch.cs.get(2 * half);
  float* m = scratch.corr.get(3 * static_cast<size_t>(Mp));  // m | l | correction
  float* l = m + Mp;
  float* corr = l + Mp;
  float* qrows = scratch.key.get(static_cast<size_t>(Mp) * D);
  for (int r = 0; r < Mp; ++r) m[r] = neg_inf, l[r] = 0.f;
  std::fill(ot, ot + static_cast<size_t>(D) * Mp, 0.f);

  // q rotated at its own position, the logit scale folded in (bf16: then rounded once,
  // as vLLM rounds its rotated q): rows first, row-major, then transposed in W x W blocks
  // (a column scattered a float at a time across D cache lines cost ~5% of a prefill)
  const float q_scale = seq.logit_scale;
  const V q_scale_v = S::set1(q_scale);
  for (int i = i0; i < i1; ++i) {
    angle_of<S>(seq, first_pos + i, half, cs);
    for (int g = 0; g < group; ++g) {
      const T* src = query + (seq.q_start + i) * sh.q_token_stride +
                     static_cast<int64_t>(kv_head * group + g) * sh.q_head_stride;
      float* row = qrows + static_cast<size_t>((i - i0) * group + g) * D;
      simd_tile::turn<S, false>(src, cs, half, D, row);
      for (int c = 0; c < D; c += W) S::store(row + c, S::mul(S::load(row + c), q_scale_v));
    }
  }
  std::fill(qrows + static_cast<size_t>(M) * D, qrows + static_cast<size_t>(Mp) * D, 0.f);
  for (int r0 = 0; r0 < Mp; r0 += W)
    for (int d0 = 0; d0 < D; d0 += W)
      for (int d = d0; d < d0 + W; ++d)
        for (int r = r0; r < r0 + W; ++r)
          qt[static_cast<size_t>(d) * Mp + r] = qrows[static_cast<size_t>(r) * D + d];
#if YARN_CPU_AVX512_BF16
  // bf16 pairs of channels per row: qp [D / 2][Mp] words; pairs of keys: pp [kKeys / 2][Mp],
  // vp [kKeys / 2][D]; keys as rows of D / 2 words: kp [kKeys][D / 2]
  uint32_t *qp = nullptr, *pp = nullptr, *vp = nullptr, *kp = nullptr;
  if constexpr (Bf16) {
    qp = reinterpret_cast<uint32_t*>(scratch.key_t.get(static_cast<size_t>(D / 2) * Mp +
                                                       static_cast<size_t>(kKeys / 2) * Mp +
                                                       static_cast<size_t>(kKeys / 2) * D +
                                                       static_cast<size_t>(kKeys) * D / 2));
    pp = qp + static_cast<size_t>(D / 2) * Mp;
    vp = pp + static_cast<size_t>(kKeys / 2) * Mp;
    kp = vp + static_cast<size_t>(kKeys / 2) * D;
    for (int c = 0; c < D; c += 2)
      for (int v = 0; v < vecs; ++v)
        _mm512_storeu_si512(qp + static_cast<size_t>(c / 2) * Mp + v * 16,
                            pair_words(_mm512_loadu_ps(qt + static_cast<size_t>(c) * Mp + v * 16),
                                       _mm512_loadu_ps(qt + static_cast<size_t>(c + 1) * Mp + v * 16)));
  }
#endif
  detail::KvRows<T, kKeys> kv(sh, seq, key_cache, value_cache, kv_head);
  kv.load_next(k0, std::min(kKeys, k1 - k0));
  kv.advance();
  for (int kt = k0; kt < k1; kt += kKeys) {
    const int n = std::min(kKeys, k1 - kt);
    // the next tile's rows, fetched while this one computes: each item streams its whole
    // causal prefix, which other cores' work evicts from L2 between items
    const int n_next = std::max(0, std::min(kKeys, k1 - kt - kKeys));
    kv.load_next(kt + kKeys, n_next);
    for (int j = 0; j < n_next; ++j)
      for (int b = 0; b < D * static_cast<int>(sizeof(T)); b += 64) {
        _mm_prefetch(reinterpret_cast<const char*>(kv.k_next[j]) + b, _MM_HINT_T0);
        _mm_prefetch(reinterpret_cast<const char*>(kv.v_next[j]) + b, _MM_HINT_T0);
      }
    const T* const* krows = kv.k;
    const T* const* vrows = kv.v;
    // a short last tile computes its n keys rounded up to whole key blocks (scores) and
    // pairs (values), not the tile's width
    const int nk = (n + KB - 1) / KB * KB, nd = (n + 1) / 2 * 2;
    // tiles the diagonal crosses skip what the causal mask hides
    const Causal diagonal{kt, pos0, group, W};
    const Causal* causal = kt + nk - 1 > pos0 ? &diagonal : nullptr;
    // keys rotated at their positions, values in fp32; past-the-end rows zero (a zero
    // probability times a zero value: no junk reaches a row)
    for (int j = 0; j < nk; ++j) {
      float* kr = keys + static_cast<size_t>(j) * D;
      float* vr = vals + static_cast<size_t>(j) * D;
      if (j >= n) {
        std::fill(kr, kr + D, 0.f);
        std::fill(vr, vr + D, 0.f);
        continue;
      }
      angle_of<S>(seq, kt + j, half, cs);
      simd_tile::turn<S, false>(krows[j], cs, half, D, kr);
      for (int c = 0; c < D; c += W) S::store(vr + c, S::load(vrows[j] + c));
    }

    // 1. scores, st [kKeys][Mp]
#if YARN_CPU_AVX512_BF16
    if constexpr (Bf16) {
      for (int j = 0; j < nk; ++j)
        for (int c = 0; c < D; c += 32) {
          const float* x = keys + static_cast<size_t>(j) * D + c;
          // 32 channels in order: the second operand's 16 become the low half
          _mm512_storeu_si512(kp + static_cast<size_t>(j) * (D / 2) + c / 2,
                              (__m512i)_mm512_cvtne2ps_pbh(_mm512_loadu_ps(x + 16),
                                                           _mm512_loadu_ps(x)));
        }
      outer_all<S, true, KB, RV>(kp, D / 2, 1, nk, qp, Mp, D / 2, vecs, st, Mp, nullptr, causal);
    } else
#endif
    {
      outer_all<S, false, KB, RV>(keys, D, 1, nk, qt, Mp, D, vecs, st, Mp, nullptr, causal);
    }
    // the causal mask and the keys past the end, where this tile has any
    if (causal != nullptr || n < kKeys)
      for (int j = 0; j < nk; ++j) {
        float* s = st + static_cast<size_t>(j) * Mp;
        // row r sees key kt + j iff kt + j <= pos0 + r / group: rows before `seen` do not
        const int seen = j >= n ? Mp : std::min(Mp, std::max(0, (kt + j - pos0) * group));
        std::fill(s, s + seen, neg_inf);
      }

    // 2. online softmax over the tile, every row at once: p = e^(s - m) into st, or
    // (bf16) straight into pairs of keys, pp [kKeys / 2][Mp] words
    for (int v = 0; v < vecs; ++v) {
      V top = S::set1(neg_inf);
      for (int j = 0; j < nd; ++j) top = S::max(top, S::load(st + static_cast<size_t>(j) * Mp + v * W));
      const V m_old = S::load(m + v * W);
      // -FLT_MAX stands in for a row that has seen no key yet: exp then gives 0, not NaN
      const V m_new = S::max(S::max(m_old, top), S::set1(-std::numeric_limits<float>::max()));
      const V c = exp_below<S>(m_old, m_new);
      S::store(corr + v * W, c);
      V sum = S::zero();
      for (int j = 0; j < nd; j += 2) {
        float* s0 = st + static_cast<size_t>(j) * Mp + v * W;
        const V p0 = exp_below<S>(S::load(s0), m_new), p1 = exp_below<S>(S::load(s0 + Mp), m_new);
        sum = S::add(sum, S::add(p0, p1));
#if YARN_CPU_AVX512_BF16
        if constexpr (Bf16) {
          _mm512_storeu_si512(pp + static_cast<size_t>(j / 2) * Mp + v * W, pair_words(p0, p1));
          continue;
        }
#endif
        S::store(s0, p0);
        S::store(s0 + Mp, p1);
      }
      S::store(l + v * W, S::fmadd(S::load(l + v * W), c, sum));
      S::store(m + v * W, m_new);
    }

    // 3. ot [D][Mp] = ot * corr + values^T . p: channels broadcast, rows loaded
#if YARN_CPU_AVX512_BF16
    if constexpr (Bf16) {
      for (int j = 0; j < nd; j += 2) {
        for (int c = 0; c < D; c += 16)
          _mm512_storeu_si512(vp + static_cast<size_t>(j / 2) * D + c,
                              pair_words(_mm512_loadu_ps(vals + static_cast<size_t>(j) * D + c),
                                         _mm512_loadu_ps(vals + static_cast<size_t>(j + 1) * D + c)));
      }
      outer_all<S, true, KB, RV>(vp, 1, D, D, pp, Mp, nd / 2, vecs, ot, Mp, corr, nullptr, causal,
                                 2);
    } else
#endif
    {
      outer_all<S, false, KB, RV>(vals, 1, D, D, st, Mp, nd, vecs, ot, Mp, corr, nullptr, causal);
    }
    kv.advance();
  }

  // the item's state, row-major as the launcher merges and writes it
  for (int r = 0; r < M; ++r) {
    state.m[r] = m[r] == -std::numeric_limits<float>::max() ? neg_inf : m[r];
    state.l[r] = l[r];
    float* acc = state.acc.data() + static_cast<size_t>(r) * D;
    for (int d = 0; d < D; ++d) acc[d] = ot[static_cast<size_t>(d) * Mp + r];
  }
}

}  // namespace rows_tile
}  // namespace yarn
