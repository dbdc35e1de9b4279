// Element types of the CPU kernels: fp16 as the compiler's _Float16, bf16 as its
// bit pattern, with scalar loads to fp32 and rounding stores. No torch headers.
#pragma once

#include <cstdint>
#include <cstring>

namespace yarn {

// bf16 travels as its bit pattern; fp16 as the compiler's native _Float16.
struct bf16 { uint16_t bits; };

inline float load(float x) { return x; }
inline float load(_Float16 x) { return static_cast<float>(x); }
inline float load(bf16 x) {
  uint32_t u = static_cast<uint32_t>(x.bits) << 16;
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

inline void store(float* p, float v) { *p = v; }
inline void store(_Float16* p, float v) { *p = static_cast<_Float16>(v); }
inline void store(bf16* p, float v) {
  uint32_t u;
  std::memcpy(&u, &v, sizeof u);
  // Round to nearest even; a NaN must stay a NaN rather than carry into the exponent.
  uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
  p->bits = static_cast<uint16_t>((v != v) ? 0x7fc0u : rounded);
}

}  // namespace yarn
