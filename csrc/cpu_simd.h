// SIMD building blocks of the CPU kernels: 8-lane (AVX2) and 16-lane (AVX-512)
// loads and rounding stores for fp32, fp16 and bf16, an 8-lane sincos and
// reductions, and F32x8 / F32x16: one interface over both widths, so that a
// kernel is written once and instantiated for each. Included only where the
// compiler targets AVX2 (the extension is built with -march for its machine);
// the AVX-512 half only where it also targets AVX-512.
#pragma once

#include <immintrin.h>

#include <cstdint>

#include "cpu_elements.h"

namespace yarn {
namespace avx2 {

inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load8(const _Float16* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}
inline __m256 load8(const bf16* p) {
  const __m256i wide = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  return _mm256_castsi256_ps(_mm256_slli_epi32(wide, 16));
}

inline void store8(float* p, __m256 v) { _mm256_storeu_ps(p, v); }
inline void store8(_Float16* p, __m256 v) {
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT));
}
inline void store8(bf16* p, __m256 v) {
  // Round to nearest even. No NaN test (it cost ~30% at cache-resident sizes):
  // every NaN reaching here has zero low 16 bits: x86 arithmetic yields the
  // default NaN or propagates an input NaN, the inputs are bf16 and cos/sin
  // are finite; so the rounding bias cannot carry a NaN into inf or -0.
  const __m256i u = _mm256_castps_si256(v);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
  __m256i r = _mm256_srli_epi32(_mm256_add_epi32(u, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7fff))), 16);
  // packus works per 128-bit lane; the two halves are packed, then stored.
  const __m128i packed = _mm_packus_epi32(_mm256_castsi256_si128(r), _mm256_extracti128_si256(r, 1));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), packed);
}

// Reduction of fp32 angles by pi/2 in double: k = round(x * 2/pi), r = x - k pi/2
// (two fused steps, so exact to well under an fp32 ulp of r), and the quadrant
// k mod 4. The quadrant is taken in double because k overflows int32 past
// ~3.4e9 rad; k itself is exact while |x| < 2^52, and callers keep |x| < 2^50.
#if defined(__AVX512F__)
inline void reduce8(__m256 angle, __m256* r, __m256i* quadrant) {
  const __m512d x = _mm512_cvtps_pd(angle);
  const __m512d k = _mm512_roundscale_pd(_mm512_mul_pd(x, _mm512_set1_pd(0.63661977236758134308)),
                                         _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512d rd = _mm512_fnmadd_pd(k, _mm512_set1_pd(6.0771005065061922e-11),
                                      _mm512_fnmadd_pd(k, _mm512_set1_pd(1.5707963267341256e+00), x));
  *r = _mm512_cvtpd_ps(rd);
  const __m512d k4 = _mm512_roundscale_pd(_mm512_mul_pd(k, _mm512_set1_pd(0.25)),
                                          _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
  *quadrant = _mm512_cvtpd_epi32(_mm512_fnmadd_pd(k4, _mm512_set1_pd(4.0), k));
}
#else
inline void reduce4(__m256d x, __m128* r, __m128i* quadrant) {
  const __m256d k = _mm256_round_pd(_mm256_mul_pd(x, _mm256_set1_pd(0.63661977236758134308)),
                                    _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m256d rd = _mm256_fnmadd_pd(k, _mm256_set1_pd(6.0771005065061922e-11),
                                      _mm256_fnmadd_pd(k, _mm256_set1_pd(1.5707963267341256e+00), x));
  *r = _mm256_cvtpd_ps(rd);
  const __m256d k4 = _mm256_floor_pd(_mm256_mul_pd(k, _mm256_set1_pd(0.25)));
  *quadrant = _mm256_cvtpd_epi32(_mm256_fnmadd_pd(k4, _mm256_set1_pd(4.0), k));
}
inline void reduce8(__m256 angle, __m256* r, __m256i* quadrant) {
  __m128 r_lo, r_hi;
  __m128i q_lo, q_hi;
  reduce4(_mm256_cvtps_pd(_mm256_castps256_ps128(angle)), &r_lo, &q_lo);
  reduce4(_mm256_cvtps_pd(_mm256_extractf128_ps(angle, 1)), &r_hi, &q_hi);
  *r = _mm256_set_m128(r_hi, r_lo);
  *quadrant = _mm256_set_m128i(q_hi, q_lo);
}
#endif

// sin and cos of 8 fp32 angles with |angle| < 2^50: the reduction above, then
// polynomials (minimax on [-pi/4, pi/4], the classic Cephes sinf/cosf
// coefficients) in fp32.
inline void sincos8(__m256 angle, __m256* s_out, __m256* c_out) {
  __m256 r;
  __m256i quadrant;
  reduce8(angle, &r, &quadrant);
  const __m256 z = _mm256_mul_ps(r, r);
  __m256 ps = _mm256_fmadd_ps(_mm256_set1_ps(-1.9515295891e-4f), z, _mm256_set1_ps(8.3321608736e-3f));
  ps = _mm256_fmadd_ps(ps, z, _mm256_set1_ps(-1.6666654611e-1f));
  const __m256 sin_r = _mm256_fmadd_ps(_mm256_mul_ps(ps, z), r, r);
  __m256 pc = _mm256_fmadd_ps(_mm256_set1_ps(2.443315711809948e-5f), z,
                              _mm256_set1_ps(-1.388731625493765e-3f));
  pc = _mm256_fmadd_ps(pc, z, _mm256_set1_ps(4.166664568298827e-2f));
  const __m256 cos_r = _mm256_add_ps(_mm256_fnmadd_ps(_mm256_set1_ps(0.5f), z, _mm256_set1_ps(1.0f)),
                                     _mm256_mul_ps(_mm256_mul_ps(pc, z), z));
  // Quadrant q: (sin, cos) = (s, c), (c, -s), (-s, -c), (-c, s) for q = 0..3.
  const __m256i q1 = _mm256_and_si256(quadrant, _mm256_set1_epi32(1));
  const __m256 swap = _mm256_castsi256_ps(_mm256_cmpeq_epi32(q1, _mm256_set1_epi32(1)));
  const __m256 s = _mm256_blendv_ps(sin_r, cos_r, swap);
  const __m256 c = _mm256_blendv_ps(cos_r, sin_r, swap);
  const __m256i sin_neg = _mm256_slli_epi32(_mm256_and_si256(quadrant, _mm256_set1_epi32(2)), 30);
  const __m256i cos_neg = _mm256_slli_epi32(
      _mm256_and_si256(_mm256_add_epi32(quadrant, _mm256_set1_epi32(1)), _mm256_set1_epi32(2)), 30);
  *s_out = _mm256_xor_ps(s, _mm256_castsi256_ps(sin_neg));
  *c_out = _mm256_xor_ps(c, _mm256_castsi256_ps(cos_neg));
}

inline float hsum8(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}
inline float hmax8(__m256 v) {  // of non-NaN lanes
  __m128 s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_max_ps(s, _mm_movehl_ps(s, s));
  s = _mm_max_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// Lane k of the result is the sum of v[k]'s 8 lanes: eight dot products finished
// at once, for about a third of the shuffles of eight separate horizontal sums.
inline __m256 sum_lanes8(const __m256* v) {
  const __m256 t0 = _mm256_hadd_ps(v[0], v[1]), t1 = _mm256_hadd_ps(v[2], v[3]);
  const __m256 t2 = _mm256_hadd_ps(v[4], v[5]), t3 = _mm256_hadd_ps(v[6], v[7]);
  const __m256 u0 = _mm256_hadd_ps(t0, t1), u1 = _mm256_hadd_ps(t2, t3);  // 4 keys per half
  return _mm256_add_ps(_mm256_permute2f128_ps(u0, u1, 0x20), _mm256_permute2f128_ps(u0, u1, 0x31));
}

}  // namespace avx2

#if defined(__AVX512F__) && defined(__AVX512BW__)
#define YARN_CPU_AVX512 1
namespace avx512 {

inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load16(const _Float16* p) {
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}
inline __m512 load16(const bf16* p) {
  const __m512i wide = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  return _mm512_castsi512_ps(_mm512_slli_epi32(wide, 16));
}

inline void store16(float* p, __m512 v) { _mm512_storeu_ps(p, v); }
inline void store16(_Float16* p, __m512 v) {
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT));
}
inline void store16(bf16* p, __m512 v) {
  // Round to nearest even, bit for bit as avx2::store8 (which says why no NaN test).
  const __m512i u = _mm512_castps_si512(v);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  const __m512i r = _mm512_srli_epi32(_mm512_add_epi32(u, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7fff))), 16);
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtepi32_epi16(r));
}

// sum_lanes8 on 16 lanes: halves of 128-bit lanes are folded between pairs of
// vectors (16 -> 8 -> 4 vectors), then within lanes; the last shuffle puts the
// keys back in order (the folds leave lanes 0..3 holding keys 0-3, 8-11, 4-7, 12-15).
inline __m512 sum_lanes16(const __m512* v) {
  __m512 w[8], x[4];
  for (int i = 0; i < 8; ++i)
    w[i] = _mm512_add_ps(_mm512_shuffle_f32x4(v[i], v[i + 8], 0x44),
                         _mm512_shuffle_f32x4(v[i], v[i + 8], 0xEE));
  for (int i = 0; i < 4; ++i)
    x[i] = _mm512_add_ps(_mm512_shuffle_f32x4(w[i], w[i + 4], 0x88),
                         _mm512_shuffle_f32x4(w[i], w[i + 4], 0xDD));
  const __m512 y0 = _mm512_add_ps(_mm512_unpacklo_ps(x[0], x[1]), _mm512_unpackhi_ps(x[0], x[1]));
  const __m512 y1 = _mm512_add_ps(_mm512_unpacklo_ps(x[2], x[3]), _mm512_unpackhi_ps(x[2], x[3]));
  const __m512d a = _mm512_castps_pd(y0), b = _mm512_castps_pd(y1);
  const __m512 z = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(a, b)),
                                 _mm512_castpd_ps(_mm512_unpackhi_pd(a, b)));
  return _mm512_shuffle_f32x4(z, z, 0xD8);
}

}  // namespace avx512
#endif

// One interface over a vector width, for kernels written once for both.
namespace simd {

// exp's polynomial, written once for both widths (below the structs).
template <class S>
typename S::V exp_polynomial(typename S::V x);

struct F32x8 {
  using V = __m256;
  static constexpr int W = 8;
  static constexpr int kRegisters = 16;
  static V zero() { return _mm256_setzero_ps(); }
  static V set1(float x) { return _mm256_set1_ps(x); }
  template <typename T> static V load(const T* p) { return avx2::load8(p); }
  template <typename T> static void store(T* p, V v) { avx2::store8(p, v); }
  static V add(V a, V b) { return _mm256_add_ps(a, b); }
  static V sub(V a, V b) { return _mm256_sub_ps(a, b); }
  static V mul(V a, V b) { return _mm256_mul_ps(a, b); }
  static V max(V a, V b) { return _mm256_max_ps(a, b); }
  static V min(V a, V b) { return _mm256_min_ps(a, b); }
  static V fmadd(V a, V b, V c) { return _mm256_fmadd_ps(a, b, c); }  // a * b + c
  static V fmsub(V a, V b, V c) { return _mm256_fmsub_ps(a, b, c); }  // a * b - c
  static V fnmadd(V a, V b, V c) { return _mm256_fnmadd_ps(a, b, c); }  // c - a * b
  static V round(V x) { return _mm256_round_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
  static V pow2(V n) {  // 2^n for whole n in [-127, 128)
    return _mm256_castsi256_ps(
        _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23));
  }
  static bool any_nan(V v) { return _mm256_movemask_ps(_mm256_cmp_ps(v, v, _CMP_UNORD_Q)) != 0; }
  static float hsum(V v) { return avx2::hsum8(v); }
  static float hmax(V v) { return avx2::hmax8(v); }
  // x < -87 (masked keys, -inf) gives exactly 0, NaN gives NaN (all bits set)
  static V exp(V x) {
    const V nan = _mm256_cmp_ps(x, x, _CMP_UNORD_Q);
    const V masked = _mm256_cmp_ps(x, set1(-87.0f), _CMP_LT_OQ);
    return _mm256_or_ps(nan, _mm256_andnot_ps(masked, exp_polynomial<F32x8>(x)));
  }
  static V sum_lanes(const V* v) { return avx2::sum_lanes8(v); }
};

#if YARN_CPU_AVX512
struct F32x16 {
  using V = __m512;
  static constexpr int W = 16;
  static constexpr int kRegisters = 32;
  static V zero() { return _mm512_setzero_ps(); }
  static V set1(float x) { return _mm512_set1_ps(x); }
  template <typename T> static V load(const T* p) { return avx512::load16(p); }
  template <typename T> static void store(T* p, V v) { avx512::store16(p, v); }
  static V add(V a, V b) { return _mm512_add_ps(a, b); }
  static V sub(V a, V b) { return _mm512_sub_ps(a, b); }
  static V mul(V a, V b) { return _mm512_mul_ps(a, b); }
  static V max(V a, V b) { return _mm512_max_ps(a, b); }
  static V min(V a, V b) { return _mm512_min_ps(a, b); }
  static V fmadd(V a, V b, V c) { return _mm512_fmadd_ps(a, b, c); }
  static V fmsub(V a, V b, V c) { return _mm512_fmsub_ps(a, b, c); }
  static V fnmadd(V a, V b, V c) { return _mm512_fnmadd_ps(a, b, c); }
  static V round(V x) {
    return _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  }
  static V pow2(V n) {
    return _mm512_castsi512_ps(
        _mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127)), 23));
  }
  static bool any_nan(V v) { return _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q) != 0; }
  static float hsum(V v) { return _mm512_reduce_add_ps(v); }
  static float hmax(V v) { return _mm512_reduce_max_ps(v); }
  static V exp(V x) {  // as F32x8::exp, lane for lane
    const __mmask16 nan = _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q);
    const __mmask16 masked = _mm512_cmp_ps_mask(x, set1(-87.0f), _CMP_LT_OQ);
    const V y = _mm512_maskz_mov_ps(static_cast<__mmask16>(~masked), exp_polynomial<F32x16>(x));
    return _mm512_mask_mov_ps(y, nan, _mm512_castsi512_ps(_mm512_set1_epi32(-1)));
  }
  static V sum_lanes(const V* v) { return avx512::sum_lanes16(v); }
};
#endif

// e^x for x clamped to [-87, 88], Cephes-style: x = n ln2 + r with |r| <= ln2 / 2 (ln2
// in two parts), e^x = 2^n (1 + r + r^2 p(r)), p of degree 5. The same operations lane
// for lane at either width, so the same bits; special cases are each width's exp.
template <class S>
typename S::V exp_polynomial(typename S::V x) {
  using V = typename S::V;
  x = S::min(S::max(x, S::set1(-87.0f)), S::set1(88.0f));
  const V n = S::round(S::mul(x, S::set1(1.44269504088896341f)));
  V r = S::fnmadd(n, S::set1(0.693359375f), x);
  r = S::fnmadd(n, S::set1(-2.12194440e-4f), r);
  V p = S::set1(1.9875691500e-4f);
  p = S::fmadd(p, r, S::set1(1.3981999507e-3f));
  p = S::fmadd(p, r, S::set1(8.3334519073e-3f));
  p = S::fmadd(p, r, S::set1(4.1665795894e-2f));
  p = S::fmadd(p, r, S::set1(1.6666665459e-1f));
  p = S::fmadd(p, r, S::set1(5.0000001201e-1f));
  p = S::fmadd(p, S::mul(r, r), S::add(r, S::set1(1.0f)));
  return S::mul(p, S::pow2(n));
}

}  // namespace simd

}  // namespace yarn
