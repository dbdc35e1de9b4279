// Host interface of the CUDA pre-RoPE paged decode attention kernel: plain C++
// types only, so the torch launcher, the .cu file and the kernel's CPU emulation
// (tests/cuda_emu) share it without torch or CUDA headers.
#pragma once
#include <cstdint>

#include "paged_attention_checks.h"
#include "rotary_cuda.h"  // DType

namespace yarn {

struct PagedDecodeArgs {
  DType dtype;                     // of out, query, key_cache and value_cache alike
  void* out;                       // (B, H_q, D) with the strides below (one token per sequence)
  const void* query;               // (B, H_q, D), before RoPE
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

// The kernel's arguments from the op's, once check_paged_shapes has passed them,
// after the kernel's own limits: head_size <= kPagedMaxHeadSize and decode
// batches only. Whether every q_len is 1 (or 0, an idle slot) needs the values:
// check_decode_values, under YARN_VLLM_CHECK_ARGS=1. The workspace is the caller's.
inline PagedDecodeArgs decode_args(const PagedArgs& a, const PagedProblem& p, bool is_neox) {
  YARN_ARG_CHECK(p.head_size <= kPagedMaxHeadSize, "query: head_size ", p.head_size,
                 " exceeds the CUDA kernel's ", kPagedMaxHeadSize);
  YARN_ARG_CHECK(p.num_tokens == p.num_seqs, "query: ", p.num_tokens, " tokens for ", p.num_seqs,
                 " sequences; the CUDA paged_attention serves decode batches only (q_len = 1). "
                 "Prefill, chunked prefill and mixed batches go to Triton: call "
                 "yarn_vllm.attention.paged.paged_attention, which routes them.");
  PagedDecodeArgs d{};
  d.dtype = static_cast<DType>(static_cast<int>(a.query.dtype));  // ArgDType's first three
  d.out = const_cast<void*>(a.out.data);
  d.query = a.query.data;
  d.key_cache = a.key_cache.data;
  d.value_cache = a.value_cache.data;
  d.block_table = a.block_table.values<int32_t>();
  d.seq_lens = a.seq_lens.values<int32_t>();
  d.query_start_loc = a.query_start_loc.values<int32_t>();
  d.inv_freq = a.inv_freq.values<float>();
  d.logit_scale = a.logit_scale.values<float>();
  d.num_seqs = static_cast<int>(p.num_seqs);
  d.num_q_heads = static_cast<int>(p.num_q_heads);
  d.num_kv_heads = static_cast<int>(p.num_kv_heads);
  d.head_size = static_cast<int>(p.head_size);
  d.rotary_dim = static_cast<int>(p.rotary_dim);
  d.block_size = static_cast<int>(p.block_size);
  d.q_token_stride = a.query.stride[0];
  d.q_head_stride = a.query.stride[1];
  d.q_dim_stride = a.query.stride[2];
  d.out_token_stride = a.out.stride[0];
  d.out_head_stride = a.out.stride[1];
  d.out_dim_stride = a.out.stride[2];
  for (int i = 0; i < 4; ++i) {
    d.k_strides[i] = a.key_cache.stride[i];
    d.v_strides[i] = a.value_cache.stride[i];
  }
  d.block_table_stride = a.block_table.stride[0];
  d.inv_freq_stride = a.inv_freq.stride[0];
  d.is_neox = is_neox;
  return d;
}

// With host-readable query_start_loc: every q_len is 1, or 0 for an idle slot.
inline void check_decode_values(const PagedArgs& a, const PagedProblem& p) {
  const int32_t* starts = a.query_start_loc.values<int32_t>();
  for (int64_t b = 0; b < p.num_seqs; ++b)
    YARN_ARG_CHECK(starts[b + 1] - starts[b] <= 1, "query_start_loc: sequence ", b, " has ",
                   starts[b + 1] - starts[b], " query tokens; the CUDA paged_attention serves "
                   "decode batches only (q_len 1, or 0 for an idle slot)");
}

}  // namespace yarn
