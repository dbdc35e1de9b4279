// Op schemas of yarn_vllm's extension. Implementations register per device in
// rotary_cpu.cpp / rotary_cuda.cpp; the fake (meta) twins live in
// yarn_vllm/ops.py, next to the PyTorch reference.
#include <Python.h>
#include <torch/library.h>

TORCH_LIBRARY(yarn_vllm, m) {
  // Rotates query (and key) in place with YaRN frequencies and magnitude.
  // positions: (T,) int64; query: (T, H_q * D) or (T, H_q, D); key likewise or None;
  // inv_freq: (rotary_dim / 2,) fp32; cos_sin_table: optional (max_pos, rotary_dim) fp32.
  m.def(
      "rotary_embedding(Tensor positions, Tensor(a!) query, Tensor(b!)? key, Tensor inv_freq, "
      "Tensor? cos_sin_table, float mscale, int head_size, bool is_neox) -> ()");

  // Causal paged attention over keys cached *before* RoPE (Dynamic YaRN): rotates each
  // sequence's queries and keys with that sequence's frequencies and multiplies its
  // logits by logit_scale[b]. Semantics: yarn_vllm/attention/reference.py.
  // out, query: (T, H_q, D), query before RoPE; key_cache, value_cache:
  // (num_blocks, H_kv, block_size, D) views, any strides; block_table: (B, max_blocks) int32;
  // seq_lens: (B,) int32; query_start_loc: (B + 1,) int32; inv_freq: (B, rotary_dim / 2) fp32;
  // logit_scale: (B,) fp32 (softmax scale x mscale(s)^2). Optional precomputed angles
  // (a CPU accelerator; other devices may compute them from inv_freq): cos_sin: fp32 rows
  // [cos | sin] of rotary_dim; sequence b's rows start at cos_sin_start[b] (int64 (B,)) and are
  // 32 "fine" rows for offsets 0..31, then a "coarse" row for each of positions 0, 32, 64, ...
  // (angle(t) = coarse[t / 32] * fine[t % 32]); see DynamicRope.angle_table.
  m.def(
      "paged_attention(Tensor(a!) out, Tensor query, Tensor key_cache, Tensor value_cache, "
      "Tensor block_table, Tensor seq_lens, Tensor query_start_loc, Tensor inv_freq, "
      "Tensor logit_scale, Tensor? cos_sin, Tensor? cos_sin_start, bool is_neox) -> ()");
}

// Importing yarn_vllm._C runs the static registrations above.
static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&module_def); }
