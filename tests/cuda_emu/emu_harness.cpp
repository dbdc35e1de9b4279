// C entry point of the emulated CUDA paged decode launcher, for ctypes. The test
// writes kernel_emu.cpp (the .cu with launches rewritten) next to this file.
//
// It runs what csrc/paged_attention_cuda.cpp runs, minus torch: the op's
// contract (check_paged_shapes, and check_paged_values + check_decode_values as
// under YARN_VLLM_CHECK_ARGS=1), the kernel's marshalling (decode_args) and its
// split sizing; only the workspace comes from a std::vector instead of at::empty.
#include <cstdio>
#include <vector>

#include "kernel_emu.cpp"

// One tensor argument as ctypes passes it; dtype is yarn::ArgDType.
struct EmuTensor {
  int32_t present, dtype, dim, pad;
  int64_t size[4], stride[4];
  void* data;
  const char* dtype_label;  // torch's name of a dtype outside ArgDType, or null
};

// tensors: the op's 11 tensor arguments in schema order (out ... cos_sin_start).
// Returns the number of splits launched, or 0 with the refusal in `error`.
extern "C" int emu_paged_decode(const EmuTensor* tensors, int is_neox, int num_sms, char* error,
                                int error_len) {
  static const char* names[] = {"out", "query", "key_cache", "value_cache", "block_table",
                                "seq_lens", "query_start_loc", "inv_freq", "logit_scale",
                                "cos_sin", "cos_sin_start"};
  yarn::PagedArgs a;
  yarn::ArgTensor* slots[] = {&a.out, &a.query, &a.key_cache, &a.value_cache, &a.block_table,
                              &a.seq_lens, &a.query_start_loc, &a.inv_freq, &a.logit_scale,
                              &a.cos_sin, &a.cos_sin_start};
  for (int i = 0; i < 11; ++i) {
    yarn::ArgTensor& t = *slots[i];
    t.name = names[i];
    t.present = tensors[i].present != 0;
    t.dtype = static_cast<yarn::ArgDType>(tensors[i].dtype);
    t.dtype_label = tensors[i].dtype_label;
    t.device = "cuda:0";
    t.dim = tensors[i].dim;
    for (int d = 0; d < 4; ++d) {
      t.size[d] = tensors[i].size[d];
      t.stride[d] = tensors[i].stride[d];
    }
    t.data = tensors[i].data;
    t.host = true;
  }
  try {
    const yarn::PagedProblem p = yarn::check_paged_shapes(a);
    yarn::check_paged_values(a, p);
    yarn::check_decode_values(a, p);
    yarn::PagedDecodeArgs d = yarn::decode_args(a, p, is_neox != 0);
    d.max_splits = yarn::paged_decode_splits(d.num_seqs, d.num_q_heads, d.num_kv_heads,
                                             p.max_blocks * p.block_size, num_sms);
    std::vector<float> workspace;  // NaN-filled: a split read before it is written shows
    if (d.max_splits > 1) {
      const int64_t rows = int64_t(d.num_seqs) * d.num_q_heads * d.max_splits;
      workspace.assign(rows * (d.head_size + 2), NAN);
      d.partial_out = workspace.data();
      d.partial_max = d.partial_out + rows * d.head_size;
      d.partial_sum = d.partial_max + rows;
    }
    const int err = yarn::paged_decode_cuda(d, nullptr);
    if (err != 0) {
      std::snprintf(error, error_len, "cudaError %d", err);
      return 0;
    }
    return d.max_splits;
  } catch (const yarn::ArgError& e) {
    std::snprintf(error, error_len, "%s", e.what());
    return 0;
  }
}
