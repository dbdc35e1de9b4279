// AVX2/FMA building blocks of the CPU rotary kernel: 8-lane loads/stores for
// fp32, fp16 and bf16, and a vectorised sincos. Included only where the
// compiler targets AVX2 (the extension is built with -march for its machine).
#pragma once

#include <immintrin.h>

#include <cstdint>

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

// sin and cos of 4 fp32 angles (given as doubles, exactly). The reduction by
// pi/2 runs in double so that angles up to ~1e9 (position 1M at the highest
// frequency) keep full fp32 accuracy; the polynomials (minimax on
// [-pi/4, pi/4], the classic Cephes sinf/cosf coefficients) run in fp32.
inline void sincos4(__m256d x, __m128* s_out, __m128* c_out) {
  const __m256d two_over_pi = _mm256_set1_pd(0.63661977236758134308);
  const __m256d pio2_hi = _mm256_set1_pd(1.5707963267341256e+00);
  const __m256d pio2_lo = _mm256_set1_pd(6.0771005065061922e-11);
  const __m256d k = _mm256_round_pd(_mm256_mul_pd(x, two_over_pi),
                                    _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m256d rd = _mm256_fnmadd_pd(k, pio2_lo, _mm256_fnmadd_pd(k, pio2_hi, x));
  const __m128 r = _mm256_cvtpd_ps(rd);
  const __m128i quadrant = _mm256_cvtpd_epi32(k);
  const __m128 z = _mm_mul_ps(r, r);
  __m128 ps = _mm_fmadd_ps(_mm_set1_ps(-1.9515295891e-4f), z, _mm_set1_ps(8.3321608736e-3f));
  ps = _mm_fmadd_ps(ps, z, _mm_set1_ps(-1.6666654611e-1f));
  const __m128 sin_r = _mm_fmadd_ps(_mm_mul_ps(ps, z), r, r);
  __m128 pc = _mm_fmadd_ps(_mm_set1_ps(2.443315711809948e-5f), z, _mm_set1_ps(-1.388731625493765e-3f));
  pc = _mm_fmadd_ps(pc, z, _mm_set1_ps(4.166664568298827e-2f));
  const __m128 cos_r = _mm_add_ps(_mm_fnmadd_ps(_mm_set1_ps(0.5f), z, _mm_set1_ps(1.0f)),
                                  _mm_mul_ps(_mm_mul_ps(pc, z), z));
  // Quadrant q: (sin, cos) = (s, c), (c, -s), (-s, -c), (-c, s) for q = 0..3.
  const __m128i q1 = _mm_and_si128(quadrant, _mm_set1_epi32(1));
  const __m128 swap = _mm_castsi128_ps(_mm_cmpeq_epi32(q1, _mm_set1_epi32(1)));
  const __m128 s = _mm_blendv_ps(sin_r, cos_r, swap);
  const __m128 c = _mm_blendv_ps(cos_r, sin_r, swap);
  const __m128i sin_neg = _mm_slli_epi32(_mm_and_si128(quadrant, _mm_set1_epi32(2)), 30);
  const __m128i cos_neg = _mm_slli_epi32(
      _mm_and_si128(_mm_add_epi32(quadrant, _mm_set1_epi32(1)), _mm_set1_epi32(2)), 30);
  *s_out = _mm_xor_ps(s, _mm_castsi128_ps(sin_neg));
  *c_out = _mm_xor_ps(c, _mm_castsi128_ps(cos_neg));
}

}  // namespace avx2
}  // namespace yarn
