// YaRN rotary embedding, CPU kernel. Header-only, raw pointers, no torch headers.
//
// Rotates q and k in place for a range of tokens. cos/sin are either computed
// on the fly from inv_freq (O(rotary_dim) memory, the default) or read from a
// [table_rows, rotary_dim] fp32 table of unscaled cos | sin halves; positions
// past the table's end fall back to computing on the fly. The YaRN magnitude
// scale `mscale` multiplies the rotated channels, as in vLLM and HF.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#include "cpu_elements.h"

namespace yarn {

constexpr int kMaxRotaryHalf = 512;  // rotary_dim <= 1024, checked by the launcher

}  // namespace yarn

#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#define YARN_CPU_AVX2 1
#include "rotary_cpu_avx2.h"
#endif

namespace yarn {

struct RotaryShape {
  int64_t num_tokens;
  int num_q_heads, num_k_heads;  // num_k_heads == 0: no key
  int head_size, rotary_dim;
  int64_t q_token_stride, q_head_stride;  // in elements; the channel stride is 1
  int64_t k_token_stride, k_head_stride;
  int64_t table_rows;  // rows of the optional cos/sin table
};

// cos/sin of position * inv_freq, times mscale. Out: [half] each.
inline void cos_sin_on_the_fly(int64_t position, const float* inv_freq, int half, float mscale,
                               float* cos_out, float* sin_out) {
  // The angle is rounded to fp32 before cos/sin, the same as an fp32 outer
  // product in the PyTorch reference, so that both agree at large positions.
  const float pos = static_cast<float>(position);
  int j = 0;
#ifdef YARN_CPU_AVX2
  const __m128 ms = _mm_set1_ps(mscale);
  for (; j + 4 <= half; j += 4) {
    const __m128 angle = _mm_mul_ps(_mm_set1_ps(pos), _mm_loadu_ps(inv_freq + j));
    __m128 s, c;
    avx2::sincos4(_mm256_cvtps_pd(angle), &s, &c);
    _mm_storeu_ps(cos_out + j, _mm_mul_ps(c, ms));
    _mm_storeu_ps(sin_out + j, _mm_mul_ps(s, ms));
  }
#endif
  for (; j < half; ++j) {
    const float angle = pos * inv_freq[j];
    cos_out[j] = std::cos(angle) * mscale;
    sin_out[j] = std::sin(angle) * mscale;
  }
}

inline void cos_sin_from_table(int64_t position, const float* table, int half, float mscale,
                               float* cos_out, float* sin_out) {
  const float* row = table + position * 2 * half;
#pragma omp simd
  for (int j = 0; j < half; ++j) {
    cos_out[j] = row[j] * mscale;
    sin_out[j] = row[half + j] * mscale;
  }
}

template <typename T>
inline void rotate_head_neox(T* __restrict__ x, const float* __restrict__ c,
                             const float* __restrict__ s, int half) {
  T* x2p = x + half;
  int j = 0;
#ifdef YARN_CPU_AVX2
  for (; j + 8 <= half; j += 8) {
    const __m256 x1 = avx2::load8(x + j), x2 = avx2::load8(x2p + j);
    const __m256 cj = _mm256_load_ps(c + j), sj = _mm256_load_ps(s + j);
    avx2::store8(x + j, _mm256_fmsub_ps(x1, cj, _mm256_mul_ps(x2, sj)));
    avx2::store8(x2p + j, _mm256_fmadd_ps(x2, cj, _mm256_mul_ps(x1, sj)));
  }
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

// Rotates tokens [begin, end). positions: [num_tokens]; table may be null.
template <typename T>
void rotary_cpu(int64_t begin, int64_t end, const int64_t* positions, T* query, T* key,
                const float* inv_freq, const float* table, const RotaryShape& shape,
                float mscale, bool is_neox) {
  const int half = shape.rotary_dim / 2;
  alignas(64) float c[kMaxRotaryHalf];
  alignas(64) float s[kMaxRotaryHalf];
  for (int64_t t = begin; t < end; ++t) {
    if (table != nullptr && positions[t] >= 0 && positions[t] < shape.table_rows) {
      cos_sin_from_table(positions[t], table, half, mscale, c, s);
    } else {
      cos_sin_on_the_fly(positions[t], inv_freq, half, mscale, c, s);
    }
    for (int h = 0; h < shape.num_q_heads; ++h) {
      T* x = query + t * shape.q_token_stride + h * shape.q_head_stride;
      is_neox ? rotate_head_neox(x, c, s, half) : rotate_head_gptj(x, c, s, half);
    }
    for (int h = 0; h < shape.num_k_heads; ++h) {
      T* x = key + t * shape.k_token_stride + h * shape.k_head_stride;
      is_neox ? rotate_head_neox(x, c, s, half) : rotate_head_gptj(x, c, s, half);
    }
  }
}

}  // namespace yarn
