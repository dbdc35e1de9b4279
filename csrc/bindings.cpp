// Op schemas of yarn_vllm's extension, and their Meta twins. Device kernels
// register in rotary_cpu.cpp / rotary_cuda.cpp / paged_attention_{cpu,cuda}.cpp.
// The Meta twins run the launchers' own argument checks (rotary_checks.h,
// paged_attention_checks.h), so torch.compile traces only calls a kernel accepts.
#include <Python.h>
#include <torch/library.h>

#include "cache_write_checks.h"
#include "rotary_checks.h"
#include "torch_args.h"

TORCH_LIBRARY(yarn_vllm, m) {
  // Rotates query (and key) in place with YaRN frequencies and magnitude.
  // positions: (T,) int64, any values: the angle is float(position) * inv_freq in fp32;
  // query: (T, H_q * D) or (T, H_q, D), 0 < H_q <= 4096 (kMaxHeads), channels contiguous,
  // token stride free; key likewise with 0 < H_k <= 4096, or None; inv_freq: (S, rotary_dim / 2) fp32 contiguous,
  // S >= 1 rows, one per scale; mscale: (S,) fp32 contiguous, the magnitude of each row;
  // scale_index: (T,) int32 contiguous, values in [0, S), or None: every token uses row 0.
  // Contract on scale_index values: the CPU launcher checks them. The CUDA launcher does
  // not read them on the host (no sync, CUDA-graph safe): its kernel clamps an index into
  // [0, S) so a bad one can never read out of bounds, and YARN_VLLM_CHECK_ARGS=1 checks
  // them (with a sync) to find such a bug.
  m.def(
      "rotary_embedding(Tensor positions, Tensor(a!) query, Tensor(b!)? key, Tensor inv_freq, "
      "Tensor mscale, Tensor? scale_index, int head_size, bool is_neox) -> ()");

  // Causal paged attention over keys cached *before* RoPE (Dynamic YaRN): rotates each
  // sequence's queries and keys with that sequence's frequencies and multiplies its
  // logits by logit_scale[b]. Semantics: yarn_vllm/attention/reference.py. Contract
  // (B = block_table.size(0)): paged_attention_checks.h. In short: out, query (T, H_q, D),
  // query before RoPE; key_cache, value_cache (num_blocks, H_kv, block_size, D) views, any
  // strides but a contiguous last dim; block_table (B, max_blocks) int32; seq_lens (B,)
  // int32; query_start_loc (B + 1,) int32; inv_freq (B, rotary_dim / 2) fp32; logit_scale
  // (B,) fp32 (softmax scale x mscale(s)^2, finite). Values (offsets, lengths, used block
  // ids, finite logit_scale) are checked by the CPU launcher; the CUDA launcher checks them
  // only under YARN_VLLM_CHECK_ARGS=1 (a host sync) and serves decode batches only
  // (q_len 1 per sequence, 0 for an idle slot).
  // Optional precomputed angles (a CPU accelerator; other devices compute them from
  // inv_freq): cos_sin: fp32 rows [cos | sin] of rotary_dim; sequence b's rows start at
  // cos_sin_start[b] (int64 (B,)) and are 32 "fine" rows for offsets 0..31, then a
  // "coarse" row for each of positions 0, 32, 64, ... (angle(t) = coarse[t / 32] *
  // fine[t % 32]); see yarn_vllm/attention/angles.py.
  m.def(
      "paged_attention(Tensor(a!) out, Tensor query, Tensor key_cache, Tensor value_cache, "
      "Tensor block_table, Tensor seq_lens, Tensor query_start_loc, Tensor inv_freq, "
      "Tensor logit_scale, Tensor? cos_sin, Tensor? cos_sin_start, bool is_neox) -> ()");

  // Writes a step's keys and values (Dynamic YaRN: before RoPE) into vLLM's CPU paged
  // cache: key, value (T, H_kv, D); kv_cache (num_blocks, H_kv, block_size, 2 * D)
  // contiguous; slot_mapping (T',) int64, -1 skips a token. Contract: cache_write_checks.h.
  m.def("kv_cache_write(Tensor key, Tensor value, Tensor(a!) kv_cache, Tensor slot_mapping) -> ()");

  // paged_attention's argument checks alone, on any device: what the Triton wrapper
  // runs, so that it has the op's contract. Values are checked for CPU tensors, and
  // for others under YARN_VLLM_CHECK_ARGS=1.
  m.def(
      "paged_attention_check(Tensor out, Tensor query, Tensor key_cache, Tensor value_cache, "
      "Tensor block_table, Tensor seq_lens, Tensor query_start_loc, Tensor inv_freq, "
      "Tensor logit_scale, Tensor? cos_sin, Tensor? cos_sin_start, bool is_neox) -> ()");
}

namespace yarn {
namespace {

void shapes_only(const RotaryCall&) {}  // the Meta twin: the contract's shapes, no kernel

void kv_cache_write_meta(const at::Tensor& key, const at::Tensor& value, at::Tensor& kv_cache,
                         const at::Tensor& slot_mapping) {
  check_cache_write(key, value, kv_cache, slot_mapping);
}

void no_kernel(const PagedOp&) {}  // the Meta twin and the check op: the contract alone
constexpr PagedValueChecks kShapesOnly{never, nullptr};
// the check op for another implementation (Triton): values as that device's launcher would
constexpr PagedValueChecks kLikeALauncher{on_host_or_request, nullptr};

}  // namespace

TORCH_LIBRARY_IMPL(yarn_vllm, Meta, m) {
  m.impl("rotary_embedding", &rotary_embedding_op<shapes_only>);
  m.impl("paged_attention", &paged_attention_op<no_kernel, kShapesOnly>);
  m.impl("kv_cache_write", &kv_cache_write_meta);
}

TORCH_LIBRARY_IMPL(yarn_vllm, CompositeExplicitAutograd, m) {
  m.impl("paged_attention_check", &paged_attention_op<no_kernel, kLikeALauncher>);
}

}  // namespace yarn

// Importing yarn_vllm._C runs the static registrations above.
static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&module_def); }
