// YaRN rotary embedding, CUDA kernel. No torch headers: `nvcc -c` compile-checks
// it on any machine with the CUDA toolkit, GPU or not.
//
// One block per token. The block first computes the token's cos/sin (times the
// YaRN mscale of its scale row) into shared memory, once for all heads, then
// every thread rotates channel pairs of q and k heads. Nothing is read back to
// the host: the launch is CUDA-graph safe.
#include <cstdint>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "cuda_dtype.cuh"
#include "rotary_cuda.h"

namespace yarn {
namespace {

__device__ __forceinline__ float to_f32(float x) { return x; }
__device__ __forceinline__ float to_f32(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_f32(__nv_bfloat16 x) { return __bfloat162float(x); }
template <typename T> __device__ __forceinline__ T from_f32(float x);
template <> __device__ __forceinline__ float from_f32<float>(float x) { return x; }
template <> __device__ __forceinline__ __half from_f32<__half>(float x) { return __float2half_rn(x); }
template <> __device__ __forceinline__ __nv_bfloat16 from_f32<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}

template <typename T>
__device__ __forceinline__ void rotate_pair(T* head, int j, int half, bool is_neox,
                                            const float* cos_s, const float* sin_s) {
  const int i1 = is_neox ? j : 2 * j;
  const int i2 = is_neox ? j + half : 2 * j + 1;
  const float x1 = to_f32(head[i1]), x2 = to_f32(head[i2]);
  head[i1] = from_f32<T>(x1 * cos_s[j] - x2 * sin_s[j]);
  head[i2] = from_f32<T>(x2 * cos_s[j] + x1 * sin_s[j]);
}

template <typename T>
__global__ void rotary_kernel(const int64_t* __restrict__ positions,
                              const int32_t* __restrict__ scale_index, T* __restrict__ query,
                              T* __restrict__ key, const float* __restrict__ inv_freq,
                              const float* __restrict__ mscale, RotaryCudaShape shape,
                              bool is_neox) {
  extern __shared__ float cos_sin[];  // [2 * half]
  const int half = shape.rotary_dim / 2;
  float* cos_s = cos_sin;
  float* sin_s = cos_sin + half;
  const int64_t t = blockIdx.x;
  const int64_t pos = positions[t];
  // The host does not read scale_index (no sync): an index out of range is
  // clamped, so it can never read past inv_freq; YARN_VLLM_CHECK_ARGS=1 finds it.
  const int row = scale_index == nullptr ? 0 : min(max(scale_index[t], 0), shape.num_scales - 1);
  const float* freq = inv_freq + static_cast<int64_t>(row) * half;
  const float ms = mscale[row];
  for (int j = threadIdx.x; j < half; j += blockDim.x) {
    // Accurate sincosf, not __sincosf: positions reach 1e6 and the fast
    // intrinsic loses the argument reduction there.
    float c, s;
    sincosf(static_cast<float>(pos) * freq[j], &s, &c);
    cos_s[j] = c * ms;
    sin_s[j] = s * ms;
  }
  __syncthreads();
  const int q_pairs = shape.num_q_heads * half;
  const int total = q_pairs + shape.num_k_heads * half;
  for (int i = threadIdx.x; i < total; i += blockDim.x) {
    if (i < q_pairs) {
      T* head = query + t * shape.q_token_stride + (i / half) * shape.q_head_stride;
      rotate_pair(head, i % half, half, is_neox, cos_s, sin_s);
    } else {
      const int k = i - q_pairs;
      T* head = key + t * shape.k_token_stride + (k / half) * shape.k_head_stride;
      rotate_pair(head, k % half, half, is_neox, cos_s, sin_s);
    }
  }
}

template <typename T>
void launch(const RotaryCudaArgs& a, cudaStream_t stream) {
  if (a.shape.num_tokens == 0) return;
  const int half = a.shape.rotary_dim / 2;
  const int pairs = (a.shape.num_q_heads + a.shape.num_k_heads) * half;
  const int threads = pairs < 512 ? ((pairs + 31) / 32) * 32 : 512;
  rotary_kernel<T><<<static_cast<unsigned>(a.shape.num_tokens), threads,
                     2 * half * sizeof(float), stream>>>(
      a.positions, a.scale_index, static_cast<T*>(a.query), static_cast<T*>(a.key), a.inv_freq,
      a.mscale, a.shape, a.is_neox);
}

}  // namespace

int rotary_cuda(const RotaryCudaArgs& args, void* stream) {
  const auto s = static_cast<cudaStream_t>(stream);
  return launch_for_dtype(args.dtype, [&](auto elem) { launch<decltype(elem)>(args, s); });
}

}  // namespace yarn
