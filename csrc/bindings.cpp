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
}

// Importing yarn_vllm._C runs the static registrations above.
static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&module_def); }
