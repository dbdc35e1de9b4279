// Pre-RoPE paged decode attention, CUDA kernel (Dynamic YaRN). No torch
// headers: `nvcc -c` compile-checks it on any machine with the CUDA toolkit.
//
// One CTA per (sequence, kv head, chunk of up to 8 of its q heads, context
// split). Each key is loaded and rotated once and serves every q head of the
// chunk (GQA). The CTA walks its split in chunks of kChunk keys with an online
// softmax: warps score keys (one key per warp, one rotation pair per lane),
// then every thread accumulates one channel of P.V. Long contexts split over
// CTAs and a second kernel merges the splits by their max and sum.
#include <cstdint>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "paged_attention_cuda.h"  // first: the CPU emulation puts its CUDA shim before it
#include "cuda_dtype.cuh"

namespace yarn {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kChunk = 256;      // keys scored per online-softmax step
constexpr int kKeysPerWarp = 4;  // keys a warp scores together
constexpr int kMaxSplits = 128;  // bounds the workspace and the merge loop
constexpr float kLog2e = 1.4426950408889634f;

__device__ __forceinline__ float to_f32(float x) { return x; }
__device__ __forceinline__ float to_f32(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_f32(__nv_bfloat16 x) { return __bfloat162float(x); }
template <typename T> __device__ __forceinline__ T from_f32(float x);
template <> __device__ __forceinline__ float from_f32<float>(float x) { return x; }
template <> __device__ __forceinline__ __half from_f32<__half>(float x) {
  return __float2half_rn(x);
}
template <> __device__ __forceinline__ __nv_bfloat16 from_f32<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}

__device__ __forceinline__ float warp_sum(float x) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
  return x;
}
__device__ __forceinline__ float warp_max(float x) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, o));
  return x;
}

// Channels of rotation pair j: NeoX pairs j with j + rotary_dim/2, GPT-J 2j with 2j + 1.
__device__ __forceinline__ void pair_channels(int j, int half, bool is_neox, int& ia, int& ib) {
  ia = is_neox ? j : 2 * j;
  ib = is_neox ? j + half : 2 * j + 1;
}

// Rotation by pos * inv_freq, the angle formed in fp32 exactly as the reference
// does. Accurate sincosf, not __sincosf: angles reach 1e5 rad at long contexts
// and the intrinsic skips the range reduction.
__device__ __forceinline__ void rotate(float pos, float inv, float& a, float& b) {
  float s, c;
  sincosf(pos * inv, &s, &c);
  const float ra = a * c - b * s;
  b = b * c + a * s;
  a = ra;
}

// The keys split `split` of a sequence covers, in whole chunks; the merge
// kernel recomputes the same numbers. Returns the number of non-empty splits.
__device__ __forceinline__ int split_range(int seq_len, int max_splits, int split, int& lo,
                                           int& hi) {
  const int chunks = (seq_len + kChunk - 1) / kChunk;
  const int splits = min(max_splits, chunks);
  const int per_split = ((chunks + splits - 1) / splits) * kChunk;
  lo = split * per_split;
  hi = min(seq_len, lo + per_split);
  return (seq_len + per_split - 1) / per_split;
}

template <typename T, int G_TILE>
__global__ void __launch_bounds__(kThreads)
paged_decode_kernel(const PagedDecodeArgs a) {
  __shared__ float q_s[G_TILE][kPagedMaxHeadSize];  // rotated, scaled queries
  __shared__ float p_s[G_TILE][kChunk];             // logits, then probabilities
  __shared__ float red_s[G_TILE][kThreads];         // P.V partials of the key lanes
  __shared__ float inv_s[kPagedMaxHeadSize / 2];
  __shared__ float m_s[G_TILE], l_s[G_TILE], alpha_s[G_TILE];

  const int seq = blockIdx.y, split = blockIdx.z;
  const int group = a.num_q_heads / a.num_kv_heads;
  const int head_chunks = (group + G_TILE - 1) / G_TILE;
  const int kv_head = blockIdx.x / head_chunks;
  const int head0 = kv_head * group + (blockIdx.x % head_chunks) * G_TILE;
  const int n_heads = min(G_TILE, kv_head * group + group - head0);
  const int q_tok = a.query_start_loc[seq];
  const int seq_len = a.seq_lens[seq];
  // The launcher guarantees one token per sequence in total; q_len 0 means an
  // idle batch slot.
  if (a.query_start_loc[seq + 1] - q_tok != 1 || seq_len <= 0) return;
  int lo, hi;
  const int splits = split_range(seq_len, a.max_splits, split, lo, hi);
  if (split >= splits) return;

  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
  const int D = a.head_size, half = a.rotary_dim / 2, rot = a.rotary_dim;
  const bool neox = a.is_neox;
  const float pos_q = static_cast<float>(seq_len - 1);
  const float scale = a.logit_scale[seq] * kLog2e;  // softmax in exp2
  for (int j = tid; j < half; j += kThreads) inv_s[j] = a.inv_freq[seq * a.inv_freq_stride + j];
  if (tid < G_TILE) {
    m_s[tid] = -INFINITY;
    l_s[tid] = 0.f;
  }
  const T* q = static_cast<const T*>(a.query) + q_tok * a.q_token_stride;
  __syncthreads();
  for (int i = tid; i < G_TILE * half; i += kThreads) {
    const int g = i / half, j = i % half;
    int ia, ib;
    pair_channels(j, half, neox, ia, ib);
    float xa = 0.f, xb = 0.f;
    if (g < n_heads) {
      const T* qh = q + (head0 + g) * a.q_head_stride;
      xa = to_f32(qh[ia * a.q_dim_stride]);
      xb = to_f32(qh[ib * a.q_dim_stride]);
      rotate(pos_q, inv_s[j], xa, xb);
    }
    q_s[g][ia] = xa * scale;
    q_s[g][ib] = xb * scale;
  }
  for (int i = tid; i < G_TILE * (D - rot); i += kThreads) {
    const int g = i / (D - rot), c = rot + i % (D - rot);
    q_s[g][c] = g < n_heads ? to_f32(q[(head0 + g) * a.q_head_stride + c * a.q_dim_stride]) * scale
                            : 0.f;
  }

  const T* kc = static_cast<const T*>(a.key_cache) + kv_head * a.k_strides[1];
  const T* vc = static_cast<const T*>(a.value_cache) + kv_head * a.v_strides[1];
  const int32_t* bt = a.block_table + seq * a.block_table_stride;
  // P.V: thread (channel d, key lane kl); KL lanes split each chunk's keys
  const int key_lanes = kThreads / D;
  const int d = tid % D, kl = tid / D;
  float acc[G_TILE];
#pragma unroll
  for (int g = 0; g < G_TILE; ++g) acc[g] = 0.f;
  __syncthreads();

  for (int base = lo; base < hi; base += kChunk) {
    const int n = min(kChunk, hi - base);
    // A warp scores kKeysPerWarp keys at once: their loads are issued together,
    // so each warp has that many in flight instead of waiting on one at a time.
    for (int k0 = warp * kKeysPerWarp; k0 < n; k0 += kWarps * kKeysPerWarp) {
      const T* kp[kKeysPerWarp];
      float part[kKeysPerWarp][G_TILE];
#pragma unroll
      for (int u = 0; u < kKeysPerWarp; ++u) {
        const int pos = base + min(k0 + u, n - 1);  // a past-the-end key repeats the last
        kp[u] = kc + static_cast<int64_t>(bt[pos / a.block_size]) * a.k_strides[0] +
                (pos % a.block_size) * a.k_strides[2];
#pragma unroll
        for (int g = 0; g < G_TILE; ++g) part[u][g] = 0.f;
      }
      for (int j = lane; j < half; j += 32) {
        int ia, ib;
        pair_channels(j, half, neox, ia, ib);
        float xa[kKeysPerWarp], xb[kKeysPerWarp];
#pragma unroll
        for (int u = 0; u < kKeysPerWarp; ++u) {
          xa[u] = to_f32(kp[u][ia * a.k_strides[3]]);
          xb[u] = to_f32(kp[u][ib * a.k_strides[3]]);
        }
        float qa[G_TILE], qb[G_TILE];
#pragma unroll
        for (int g = 0; g < G_TILE; ++g) {
          qa[g] = q_s[g][ia];
          qb[g] = q_s[g][ib];
        }
#pragma unroll
        for (int u = 0; u < kKeysPerWarp; ++u) {
          rotate(static_cast<float>(base + min(k0 + u, n - 1)), inv_s[j], xa[u], xb[u]);
#pragma unroll
          for (int g = 0; g < G_TILE; ++g) part[u][g] += qa[g] * xa[u] + qb[g] * xb[u];
        }
      }
      for (int c = rot + lane; c < D; c += 32) {
#pragma unroll
        for (int u = 0; u < kKeysPerWarp; ++u) {
          const float x = to_f32(kp[u][c * a.k_strides[3]]);
#pragma unroll
          for (int g = 0; g < G_TILE; ++g) part[u][g] += q_s[g][c] * x;
        }
      }
#pragma unroll
      for (int u = 0; u < kKeysPerWarp; ++u) {
#pragma unroll
        for (int g = 0; g < G_TILE; ++g) {
          const float s = warp_sum(part[u][g]);
          if (lane == 0 && k0 + u < n) p_s[g][k0 + u] = s;
        }
      }
    }
    __syncthreads();
    if (warp < G_TILE) {  // one warp per head: chunk max, probabilities, running sum
      const int g = warp;
      float mx = -INFINITY;
      for (int k = lane; k < n; k += 32) mx = fmaxf(mx, p_s[g][k]);
      const float m_old = m_s[g];
      const float m_new = fmaxf(m_old, warp_max(mx));
      float sum = 0.f;
      for (int k = lane; k < n; k += 32) {
        const float p = exp2f(p_s[g][k] - m_new);
        p_s[g][k] = p;
        sum += p;
      }
      sum = warp_sum(sum);
      __syncwarp();
      if (lane == 0) {
        const float alpha = exp2f(m_old - m_new);  // 0 on the first chunk (m_old = -inf)
        alpha_s[g] = alpha;
        l_s[g] = l_s[g] * alpha + sum;
        m_s[g] = m_new;
      }
    }
    __syncthreads();
    if (kl < key_lanes) {
#pragma unroll
      for (int g = 0; g < G_TILE; ++g) acc[g] *= alpha_s[g];
#pragma unroll 4
      for (int k = kl; k < n; k += key_lanes) {
        const int pos = base + k;
        const T* vp = vc + static_cast<int64_t>(bt[pos / a.block_size]) * a.v_strides[0] +
                      (pos % a.block_size) * a.v_strides[2];
        const float v = to_f32(vp[d * a.v_strides[3]]);
#pragma unroll
        for (int g = 0; g < G_TILE; ++g) acc[g] += p_s[g][k] * v;
      }
    }
    __syncthreads();  // p_s is rewritten by the next chunk
  }

#pragma unroll
  for (int g = 0; g < G_TILE; ++g) red_s[g][tid] = acc[g];
  __syncthreads();
  if (tid >= D) return;
  for (int g = 0; g < n_heads; ++g) {
    float o = 0.f;
    for (int l = 0; l < key_lanes; ++l) o += red_s[g][l * D + d];
    o /= l_s[g];
    const int head = head0 + g;
    if (splits == 1) {
      T* out = static_cast<T*>(a.out) + q_tok * a.out_token_stride + head * a.out_head_stride;
      out[d * a.out_dim_stride] = from_f32<T>(o);
    } else {
      const int64_t row = (static_cast<int64_t>(seq) * a.num_q_heads + head) * a.max_splits + split;
      a.partial_out[row * D + d] = o;
      if (d == 0) {
        a.partial_max[row] = m_s[g];
        a.partial_sum[row] = l_s[g];
      }
    }
  }
}

// Merges the splits of one (sequence, q head): each split's output is
// normalised by its own sum, so the weights are sum_s * 2^(max_s - max).
template <typename T>
__global__ void paged_decode_merge_kernel(const PagedDecodeArgs a) {
  __shared__ float w_s[kMaxSplits];
  const int head = blockIdx.x, seq = blockIdx.y;
  const int seq_len = a.seq_lens[seq];
  const int q_tok = a.query_start_loc[seq];
  if (a.query_start_loc[seq + 1] - q_tok != 1 || seq_len <= 0) return;
  int lo, hi;
  const int splits = split_range(seq_len, a.max_splits, 0, lo, hi);
  if (splits <= 1) return;  // the attention kernel wrote this one directly
  const int64_t row0 = (static_cast<int64_t>(seq) * a.num_q_heads + head) * a.max_splits;
  float mx = -INFINITY;
  for (int s = 0; s < splits; ++s) mx = fmaxf(mx, a.partial_max[row0 + s]);
  for (int s = threadIdx.x; s < splits; s += blockDim.x)
    w_s[s] = a.partial_sum[row0 + s] * exp2f(a.partial_max[row0 + s] - mx);
  __syncthreads();
  float total = 0.f;
  for (int s = 0; s < splits; ++s) total += w_s[s];
  T* out = static_cast<T*>(a.out) + q_tok * a.out_token_stride + head * a.out_head_stride;
  for (int d = threadIdx.x; d < a.head_size; d += blockDim.x) {
    float o = 0.f;
    for (int s = 0; s < splits; ++s) o += w_s[s] * a.partial_out[(row0 + s) * a.head_size + d];
    out[d * a.out_dim_stride] = from_f32<T>(o / total);
  }
}

// q heads per CTA: a group of 3 runs in a tile of 4; one of 12 in two tiles of 8
int head_tile(int group) { return group > 4 ? 8 : group > 2 ? 4 : group; }

template <typename T, int G_TILE>
void launch_tile(const PagedDecodeArgs& a, dim3 grid, cudaStream_t stream) {
  paged_decode_kernel<T, G_TILE><<<grid, kThreads, 0, stream>>>(a);
}

template <typename T>
void launch(const PagedDecodeArgs& a, cudaStream_t stream) {
  const int group = a.num_q_heads / a.num_kv_heads;
  const int tile = head_tile(group);
  const int head_chunks = (group + tile - 1) / tile;
  const dim3 grid(a.num_kv_heads * head_chunks, a.num_seqs, a.max_splits);
  switch (tile) {
    case 1: launch_tile<T, 1>(a, grid, stream); break;
    case 2: launch_tile<T, 2>(a, grid, stream); break;
    case 4: launch_tile<T, 4>(a, grid, stream); break;
    default: launch_tile<T, 8>(a, grid, stream); break;
  }
  if (a.max_splits > 1) {
    paged_decode_merge_kernel<T><<<dim3(a.num_q_heads, a.num_seqs), 128, 0, stream>>>(a);
  }
}

}  // namespace

int paged_decode_splits(int num_seqs, int num_q_heads, int num_kv_heads, int64_t max_context,
                        int num_sms) {
  const int group = num_q_heads / num_kv_heads;
  const int tile = head_tile(group);
  const int64_t ctas = static_cast<int64_t>(num_seqs) * num_kv_heads * ((group + tile - 1) / tile);
  if (ctas <= 0) return 1;  // an empty batch launches nothing
  const int64_t chunks = (max_context + kChunk - 1) / kChunk;
  // about four resident CTAs per SM hide the load latency of the other three
  const int64_t want = (4LL * num_sms + ctas - 1) / ctas;
  const int64_t splits = want < chunks ? want : chunks;
  return static_cast<int>(splits < 1 ? 1 : splits > kMaxSplits ? kMaxSplits : splits);
}

int paged_decode_cuda(const PagedDecodeArgs& args, void* stream) {
  if (args.num_seqs == 0) return 0;
  if (args.head_size > kPagedMaxHeadSize || args.max_splits < 1 || args.max_splits > kMaxSplits)
    return static_cast<int>(cudaErrorInvalidValue);
  const auto s = static_cast<cudaStream_t>(stream);
  return launch_for_dtype(args.dtype, [&](auto elem) { launch<decltype(elem)>(args, s); });
}

}  // namespace yarn
