// CUDA launcher of the pre-RoPE paged attention op, for decode batches (one
// query token per sequence): validates, sizes the split workspace, then calls
// the torch-free kernel on the current stream. Prefill and mixed batches are
// served by the Triton kernel (yarn_vllm/attention/triton_paged.py); this
// implementation refuses them rather than guess.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>
#include <torch/library.h>

#include "paged_attention_cuda.h"

namespace yarn {
namespace {

DType to_dtype(at::ScalarType t) {
  return t == at::kFloat ? DType::kFloat32 : t == at::kHalf ? DType::kFloat16 : DType::kBFloat16;
}

int num_sms(int device) {
  int n = 0;
  cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, device);
  return n > 0 ? n : 1;
}

void check_int32(const at::Tensor& t, const char* name, const at::Tensor& query) {
  TORCH_CHECK(t.scalar_type() == at::kInt, name, ": expected int32, got ", t.scalar_type());
  TORCH_CHECK(t.device() == query.device(), name, ": on ", t.device(), ", query on ",
              query.device());
}

// out, query: (B, H_q, D); key_cache, value_cache: (num_blocks, H_kv, block_size, D);
// block_table: (B, max_blocks) int32; seq_lens: (B,) int32; query_start_loc: (B + 1,) int32;
// inv_freq: (B, rotary_dim / 2) fp32; logit_scale: (B,) fp32.
PagedDecodeArgs check_decode_args(at::Tensor& out, const at::Tensor& query,
                                  const at::Tensor& key_cache, const at::Tensor& value_cache,
                                  const at::Tensor& block_table, const at::Tensor& seq_lens,
                                  const at::Tensor& query_start_loc, const at::Tensor& inv_freq,
                                  const at::Tensor& logit_scale, bool is_neox) {
  TORCH_CHECK(query.is_cuda(), "query: expected a CUDA tensor, got ", query.device());
  TORCH_CHECK(query.dim() == 3, "query: expected (T, H_q, D), got ", query.sizes());
  const auto dtype = query.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16,
              "query: dtype must be float32, float16 or bfloat16, got ", dtype);
  TORCH_CHECK(out.sizes() == query.sizes(), "out: shape ", out.sizes(), " != query's ",
              query.sizes());
  TORCH_CHECK(key_cache.dim() == 4, "key_cache: expected (num_blocks, H_kv, block_size, D), got ",
              key_cache.sizes());
  TORCH_CHECK(value_cache.sizes() == key_cache.sizes(), "value_cache: shape ",
              value_cache.sizes(), " != key_cache's ", key_cache.sizes());
  for (auto [name, t] : {std::pair<const char*, const at::Tensor*>{"out", &out},
                         {"key_cache", &key_cache}, {"value_cache", &value_cache}}) {
    TORCH_CHECK(t->scalar_type() == dtype, name, ": dtype ", t->scalar_type(),
                " differs from query's ", dtype, " (the CUDA kernel takes one dtype)");
    TORCH_CHECK(t->device() == query.device(), name, ": on ", t->device(), ", query on ",
                query.device());
  }
  const int64_t head_size = query.size(2);
  TORCH_CHECK(key_cache.size(3) == head_size, "key_cache: head_size ", key_cache.size(3),
              " != query's ", head_size);
  TORCH_CHECK(head_size <= kPagedMaxHeadSize, "query: head_size ", head_size,
              " exceeds the CUDA kernel's ", kPagedMaxHeadSize);
  TORCH_CHECK(key_cache.size(1) > 0 && query.size(1) % key_cache.size(1) == 0, "query: ",
              query.size(1), " heads is not a multiple of key_cache's ", key_cache.size(1));
  check_int32(block_table, "block_table", query);
  check_int32(seq_lens, "seq_lens", query);
  check_int32(query_start_loc, "query_start_loc", query);
  const int64_t num_seqs = block_table.size(0);
  TORCH_CHECK(block_table.dim() == 2 && block_table.stride(1) == 1,
              "block_table: expected (B, max_blocks) with contiguous rows");
  TORCH_CHECK(seq_lens.dim() == 1 && seq_lens.size(0) == num_seqs && seq_lens.is_contiguous(),
              "seq_lens: expected contiguous (", num_seqs, ",), got ", seq_lens.sizes());
  TORCH_CHECK(query_start_loc.dim() == 1 && query_start_loc.size(0) == num_seqs + 1 &&
                  query_start_loc.is_contiguous(),
              "query_start_loc: expected contiguous (", num_seqs + 1, ",), got ",
              query_start_loc.sizes());
  // Reading query_start_loc would cost a device sync; one token per sequence in
  // total is what a decode batch has, and anything else has a sequence with q_len > 1.
  TORCH_CHECK(query.size(0) == num_seqs, "query: ", query.size(0), " tokens for ", num_seqs,
              " sequences; the CUDA paged_attention serves decode batches only (q_len = 1). "
              "Prefill, chunked prefill and mixed batches go to "
              "yarn_vllm.attention.triton_paged.paged_attention_triton.");
  TORCH_CHECK(inv_freq.scalar_type() == at::kFloat && inv_freq.dim() == 2 &&
                  inv_freq.size(0) == num_seqs && inv_freq.stride(1) == 1 &&
                  inv_freq.device() == query.device(),
              "inv_freq: expected fp32 (", num_seqs, ", rotary_dim / 2) with contiguous rows on ",
              query.device(), ", got ", inv_freq.scalar_type(), " ", inv_freq.sizes());
  const int64_t rotary_dim = 2 * inv_freq.size(1);
  TORCH_CHECK(rotary_dim > 0 && rotary_dim <= head_size, "inv_freq: rotary_dim ", rotary_dim,
              " must be in (0, head_size=", head_size, "]");
  TORCH_CHECK(logit_scale.scalar_type() == at::kFloat && logit_scale.dim() == 1 &&
                  logit_scale.size(0) == num_seqs && logit_scale.is_contiguous() &&
                  logit_scale.device() == query.device(),
              "logit_scale: expected contiguous fp32 (", num_seqs, ",) on ", query.device());

  PagedDecodeArgs a{};
  a.dtype = to_dtype(dtype);
  a.out = out.data_ptr();
  a.query = query.data_ptr();
  a.key_cache = key_cache.data_ptr();
  a.value_cache = value_cache.data_ptr();
  a.block_table = block_table.data_ptr<int32_t>();
  a.seq_lens = seq_lens.data_ptr<int32_t>();
  a.query_start_loc = query_start_loc.data_ptr<int32_t>();
  a.inv_freq = inv_freq.data_ptr<float>();
  a.logit_scale = logit_scale.data_ptr<float>();
  a.num_seqs = static_cast<int>(num_seqs);
  a.num_q_heads = static_cast<int>(query.size(1));
  a.num_kv_heads = static_cast<int>(key_cache.size(1));
  a.head_size = static_cast<int>(head_size);
  a.rotary_dim = static_cast<int>(rotary_dim);
  a.block_size = static_cast<int>(key_cache.size(2));
  a.q_token_stride = query.stride(0);
  a.q_head_stride = query.stride(1);
  a.q_dim_stride = query.stride(2);
  a.out_token_stride = out.stride(0);
  a.out_head_stride = out.stride(1);
  a.out_dim_stride = out.stride(2);
  for (int i = 0; i < 4; ++i) {
    a.k_strides[i] = key_cache.stride(i);
    a.v_strides[i] = value_cache.stride(i);
  }
  a.block_table_stride = block_table.stride(0);
  a.inv_freq_stride = inv_freq.stride(0);
  a.is_neox = is_neox;
  return a;
}

void run_decode(PagedDecodeArgs a, const at::Tensor& query, const at::Tensor& block_table,
                const at::Tensor& key_cache) {
  const c10::cuda::CUDAGuard guard(query.device());
  // The block table's width bounds every sequence's length without a device
  // sync; splits past a sequence's own length exit at once.
  const int64_t max_context = block_table.size(1) * key_cache.size(2);
  a.max_splits = paged_decode_splits(a.num_seqs, a.num_q_heads, a.num_kv_heads, max_context,
                                     num_sms(query.get_device()));
  at::Tensor workspace;
  if (a.max_splits > 1) {
    const int64_t rows = static_cast<int64_t>(a.num_seqs) * a.num_q_heads * a.max_splits;
    workspace = at::empty({rows * (a.head_size + 2)}, query.options().dtype(at::kFloat));
    a.partial_out = workspace.data_ptr<float>();
    a.partial_max = a.partial_out + rows * a.head_size;
    a.partial_sum = a.partial_max + rows;
  }
  const int err = paged_decode_cuda(a, c10::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(err == 0, "yarn_vllm paged_attention CUDA kernel failed with cudaError ", err);
}

// cos_sin / cos_sin_start (the CPU kernel's coarse x fine angle table) are
// ignored here: the kernel forms each angle as pos * inv_freq[b, j] in fp32 and
// takes sincosf of it, the reference's own definition, and on a GPU that is
// cheaper than reading table rows next to every key.
void paged_attention_cuda(at::Tensor& out, const at::Tensor& query, const at::Tensor& key_cache,
                          const at::Tensor& value_cache, const at::Tensor& block_table,
                          const at::Tensor& seq_lens, const at::Tensor& query_start_loc,
                          const at::Tensor& inv_freq, const at::Tensor& logit_scale,
                          const std::optional<at::Tensor>& cos_sin,
                          const std::optional<at::Tensor>& cos_sin_start, bool is_neox) {
  PagedDecodeArgs a = check_decode_args(out, query, key_cache, value_cache, block_table, seq_lens,
                                        query_start_loc, inv_freq, logit_scale, is_neox);
  a.rotate = true;
  run_decode(a, query, block_table, key_cache);
}

// The same kernel with rotate=false reads query and keys as already rotated:
// the benchmark's baseline, so that "rotate on load" is measured against
// exactly the kernel that does not.
void paged_decode_cuda_op(at::Tensor& out, const at::Tensor& query, const at::Tensor& key_cache,
                          const at::Tensor& value_cache, const at::Tensor& block_table,
                          const at::Tensor& seq_lens, const at::Tensor& query_start_loc,
                          const at::Tensor& inv_freq, const at::Tensor& logit_scale,
                          bool is_neox, bool rotate) {
  PagedDecodeArgs a = check_decode_args(out, query, key_cache, value_cache, block_table, seq_lens,
                                        query_start_loc, inv_freq, logit_scale, is_neox);
  a.rotate = rotate;
  run_decode(a, query, block_table, key_cache);
}

}  // namespace

// A CUDA-only op, so it is declared here and not in bindings.cpp, whose schemas
// every build (CPU included) implements.
TORCH_LIBRARY_FRAGMENT(yarn_vllm, m) {
  m.def(
      "paged_attention_decode_cuda(Tensor(a!) out, Tensor query, Tensor key_cache, "
      "Tensor value_cache, Tensor block_table, Tensor seq_lens, Tensor query_start_loc, "
      "Tensor inv_freq, Tensor logit_scale, bool is_neox, bool rotate) -> ()");
}

TORCH_LIBRARY_IMPL(yarn_vllm, CUDA, m) {
  m.impl("paged_attention", &paged_attention_cuda);
  m.impl("paged_attention_decode_cuda", &paged_decode_cuda_op);
}

}  // namespace yarn
