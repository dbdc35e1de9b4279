// YaRN rotary embedding, CPU kernel. Header-only, raw pointers, no torch headers.
//
// Rotates q and k in place for a range of tokens. Token t uses frequency row
// r = scale_index[t] (row 0 without an index) of inv_freq [num_scales, rotary_dim / 2]
// and magnitude mscale[r]: static YaRN is one row, request mode one row per
// scale on offer. cos/sin of the fp32 angle position * inv_freq are computed on
// the fly (O(rotary_dim) state) and multiply by mscale, as in vLLM and HF.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

#include "cpu_elements.h"

namespace yarn {

constexpr int kMaxRotaryHalf = 512;  // rotary_dim <= 1024, checked by the launcher

}  // namespace yarn

#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#define YARN_CPU_AVX2 1
#include "cpu_simd.h"
#endif

namespace yarn {

struct RotaryShape {
  int64_t num_tokens;
  int num_q_heads, num_k_heads;  // num_k_heads == 0: no key
  int head_size, rotary_dim;
  int64_t q_token_stride, q_head_stride;  // in elements; the channel stride is 1
  int64_t k_token_stride, k_head_stride;
};

// cos/sin of position * inv_freq, times mscale. Out: [half] each (the buffers
// hold kMaxRotaryHalf: the vector loop writes whole groups of 8).
inline void cos_sin_on_the_fly(int64_t position, const float* inv_freq, int half, float mscale,
                               float* cos_out, float* sin_out) {
  // The angle is rounded to fp32 before cos/sin, the same as the fp32 product in
  // the PyTorch reference, so that both agree at large positions.
  const float pos = static_cast<float>(position);
  int j = 0;
#ifdef YARN_CPU_AVX2
  const __m256 ms = _mm256_set1_ps(mscale);
  // Vector lanes in whole groups of 4 and libm for the last half % 4, as this kernel
  // always split them: static mode's results stay the same bit for bit.
  const int vector_lanes = half & ~3;
  for (; j < vector_lanes; j += 8) {
    const __m256i lanes = _mm256_cmpgt_epi32(_mm256_set1_epi32(vector_lanes - j),
                                             _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
    const __m256 angle = _mm256_mul_ps(_mm256_set1_ps(pos), _mm256_maskload_ps(inv_freq + j, lanes));
    // sincos8 is exact below 2^50 rad; past it (or for inf/NaN) libm serves the rest
    const __m256 magnitude = _mm256_andnot_ps(_mm256_set1_ps(-0.0f), angle);
    if (_mm256_movemask_ps(_mm256_cmp_ps(magnitude, _mm256_set1_ps(0x1p50f), _CMP_NLT_UQ))) break;
    __m256 s, c;
    avx2::sincos8(angle, &s, &c);
    _mm256_store_ps(cos_out + j, _mm256_mul_ps(c, ms));
    _mm256_store_ps(sin_out + j, _mm256_mul_ps(s, ms));
  }
  j = std::min(j, vector_lanes);  // a partial last group covered only its own lanes
#endif
  for (; j < half; ++j) {
    const float angle = pos * inv_freq[j];
    cos_out[j] = std::cos(angle) * mscale;
    sin_out[j] = std::sin(angle) * mscale;
  }
}

#ifdef YARN_CPU_AVX2
// Rotates NeoX pairs (x[j], x2p[j]) from j while S::W of them fit before `half`; returns
// the first pair left.
template <class S, typename T>
inline int rotate_pairs(T* x, T* x2p, const float* c, const float* s, int j, int half) {
  for (; j + S::W <= half; j += S::W) {
    const typename S::V x1 = S::load(x + j), x2 = S::load(x2p + j);
    const typename S::V cj = S::load(c + j), sj = S::load(s + j);
    S::store(x + j, S::fmsub(x1, cj, S::mul(x2, sj)));
    S::store(x2p + j, S::fmadd(x2, cj, S::mul(x1, sj)));
  }
  return j;
}
#endif

template <typename T>
inline void rotate_head_neox(T* __restrict__ x, const float* __restrict__ c,
                             const float* __restrict__ s, int half) {
  T* x2p = x + half;
  int j = 0;
#ifdef YARN_CPU_AVX512
  j = rotate_pairs<simd::F32x16>(x, x2p, c, s, j, half);
#endif
#ifdef YARN_CPU_AVX2
  j = rotate_pairs<simd::F32x8>(x, x2p, c, s, j, half);
#endif
  for (; j < half; ++j) {
    const float x1 = load(x[j]), x2 = load(x2p[j]);
    store(x + j, x1 * c[j] - x2 * s[j]);
    store(x2p + j, x2 * c[j] + x1 * s[j]);
  }
}

template <typename T>
inline void rotate_head_gptj(T* x, const float* c, const float* s, int half) {
#pragma omp simd
  for (int j = 0; j < half; ++j) {
    const float x1 = load(x[2 * j]), x2 = load(x[2 * j + 1]);
    store(x + 2 * j, x1 * c[j] - x2 * s[j]);
    store(x + 2 * j + 1, x2 * c[j] + x1 * s[j]);
  }
}

template <typename T>
inline void rotate_heads(T* x, int num_heads, int64_t head_stride, const float* c,
                         const float* s, int half, bool is_neox) {
  for (int h = 0; h < num_heads; ++h)
    is_neox ? rotate_head_neox(x + h * head_stride, c, s, half)
            : rotate_head_gptj(x + h * head_stride, c, s, half);
}

// Rotates tokens [begin, end). positions: [num_tokens]; scale_index: [num_tokens]
// rows of inv_freq / mscale, already checked by the caller, or null for row 0.
template <typename T>
void rotary_cpu(int64_t begin, int64_t end, const int64_t* positions, const int32_t* scale_index,
                T* query, T* key, const float* inv_freq, const float* mscale,
                const RotaryShape& shape, bool is_neox) {
  const int half = shape.rotary_dim / 2;
  alignas(64) float c[kMaxRotaryHalf];
  alignas(64) float s[kMaxRotaryHalf];
  for (int64_t t = begin; t < end; ++t) {
    const int64_t row = scale_index != nullptr ? scale_index[t] : 0;
    cos_sin_on_the_fly(positions[t], inv_freq + row * half, half, mscale[row], c, s);
    rotate_heads(query + t * shape.q_token_stride, shape.num_q_heads, shape.q_head_stride, c, s,
                 half, is_neox);
    if (key != nullptr)
      rotate_heads(key + t * shape.k_token_stride, shape.num_k_heads, shape.k_head_stride, c, s,
                   half, is_neox);
  }
}

}  // namespace yarn
