// Host interface of the CUDA pre-RoPE paged decode attention kernel: plain C++
// types only, so the torch launcher and the .cu file share it without either's
// headers.
#pragma once
#include <cstdint>

#include "rotary_cuda.h"  // DType

namespace yarn {

struct PagedDecodeArgs {
  DType dtype;                     // of out, query, key_cache and value_cache alike
  void* out;                       // (B, H_q, D) with the strides below (one token per sequence)
  const void* query;               // (B, H_q, D), before RoPE (after it when !rotate)
  const void* key_cache;           // (num_blocks, H_kv, block_size, D), any strides
  const void* value_cache;         // likewise
  const int32_t* block_table;      // (B, max_blocks), row stride block_table_stride
  const int32_t* seq_lens;         // (B,)
  const int32_t* query_start_loc;  // (B + 1,); q_len must be 1 (0 skips the sequence)
  const float* inv_freq;           // (B, rotary_dim / 2), row stride inv_freq_stride
  const float* logit_scale;        // (B,)
  // Workspace for split sequences, fp32: partial_out (B, H_q, max_splits, D),
  // partial_max and partial_sum (B, H_q, max_splits). Unused when max_splits == 1.
  float* partial_out;
  float* partial_max;
  float* partial_sum;
  int num_seqs, num_q_heads, num_kv_heads, head_size, rotary_dim, block_size, max_splits;
  int64_t q_token_stride, q_head_stride, q_dim_stride;
  int64_t out_token_stride, out_head_stride, out_dim_stride;
  int64_t k_strides[4], v_strides[4];
  int64_t block_table_stride, inv_freq_stride;
  bool is_neox;
  bool rotate;  // false: q and the cached keys are already rotated (benchmark baseline)
};

// Largest head_size the kernel takes (it sizes shared memory).
constexpr int kPagedMaxHeadSize = 256;

// How many context splits to launch for this batch, given an upper bound on any
// sequence's length: enough CTAs to fill `num_sms` SMs, never more than the
// context has chunks. The launcher sizes the workspace from it.
int paged_decode_splits(int num_seqs, int num_q_heads, int num_kv_heads, int64_t max_context,
                        int num_sms);

// Launches on `stream` (a cudaStream_t). Returns the cudaError_t as an int (0 = ok).
int paged_decode_cuda(const PagedDecodeArgs& args, void* stream);

}  // namespace yarn
