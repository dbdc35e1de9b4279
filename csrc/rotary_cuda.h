// Host interface of the CUDA rotary kernel: plain C++ types only, so that the
// torch launcher and the .cu file share it without either's headers.
#pragma once
#include <cstdint>

namespace yarn {

enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

struct RotaryCudaShape {
  int64_t num_tokens;
  int num_q_heads, num_k_heads;
  int head_size, rotary_dim;
  int64_t q_token_stride, q_head_stride, k_token_stride, k_head_stride;
  int num_scales;  // rows of inv_freq and mscale
};

struct RotaryCudaArgs {
  DType dtype;
  const int64_t* positions;     // [num_tokens], device
  const int32_t* scale_index;   // [num_tokens] rows of inv_freq, clamped into range; or null
  void* query;                  // q: (num_tokens, H_q, head_size) with the strides above
  void* key;                    // k: (num_tokens, H_k, head_size), or null
  const float* inv_freq;        // [num_scales, rotary_dim / 2] fp32
  const float* mscale;          // [num_scales] fp32
  RotaryCudaShape shape;
  bool is_neox;
};

// Launches on `stream` (a cudaStream_t). Returns the cudaError_t as an int (0 = ok).
int rotary_cuda(const RotaryCudaArgs& args, void* stream);

}  // namespace yarn
