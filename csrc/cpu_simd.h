// SIMD building blocks of the CPU kernels: 8-lane (AVX2) and 16-lane (AVX-512)
// loads and rounding stores for fp32, fp16 and bf16, and an 8-lane sincos.
// Included only where the compiler targets AVX2 (the extension is built with
// -march for its machine); the AVX-512 half only where it also targets AVX-512.
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

}  // namespace avx512
#endif

}  // namespace yarn
