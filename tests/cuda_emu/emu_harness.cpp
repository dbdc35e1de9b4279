// C entry point of the emulated CUDA paged decode kernel, for ctypes. The test
// writes kernel_emu.cpp (the .cu with launches rewritten) next to this file.
#include "kernel_emu.cpp"

extern "C" int emu_paged_decode(int dtype, void* out, const void* query, const void* key_cache,
                                const void* value_cache, const int32_t* block_table,
                                const int32_t* seq_lens, const int32_t* query_start_loc,
                                const float* inv_freq, const float* logit_scale,
                                const int64_t* sizes,    // B, H_q, H_kv, D, rotary_dim, block_size
                                const int64_t* strides,  // q[3], out[3], k[4], v[4], bt, inv
                                int is_neox, int rotate, int64_t max_context, int num_sms) {
  yarn::PagedDecodeArgs a{};
  a.dtype = static_cast<yarn::DType>(dtype);
  a.out = out;
  a.query = query;
  a.key_cache = key_cache;
  a.value_cache = value_cache;
  a.block_table = block_table;
  a.seq_lens = seq_lens;
  a.query_start_loc = query_start_loc;
  a.inv_freq = inv_freq;
  a.logit_scale = logit_scale;
  a.num_seqs = int(sizes[0]);
  a.num_q_heads = int(sizes[1]);
  a.num_kv_heads = int(sizes[2]);
  a.head_size = int(sizes[3]);
  a.rotary_dim = int(sizes[4]);
  a.block_size = int(sizes[5]);
  a.q_token_stride = strides[0];
  a.q_head_stride = strides[1];
  a.q_dim_stride = strides[2];
  a.out_token_stride = strides[3];
  a.out_head_stride = strides[4];
  a.out_dim_stride = strides[5];
  for (int i = 0; i < 4; ++i) {
    a.k_strides[i] = strides[6 + i];
    a.v_strides[i] = strides[10 + i];
  }
  a.block_table_stride = strides[14];
  a.inv_freq_stride = strides[15];
  a.is_neox = is_neox;
  a.rotate = rotate;
  a.max_splits = yarn::paged_decode_splits(a.num_seqs, a.num_q_heads, a.num_kv_heads,
                                           max_context, num_sms);
  std::vector<float> workspace;  // NaN-filled: a split read before it is written shows
  if (a.max_splits > 1) {
    const int64_t rows = int64_t(a.num_seqs) * a.num_q_heads * a.max_splits;
    workspace.assign(rows * (a.head_size + 2), NAN);
    a.partial_out = workspace.data();
    a.partial_max = a.partial_out + rows * a.head_size;
    a.partial_sum = a.partial_max + rows;
  }
  const int err = yarn::paged_decode_cuda(a, nullptr);
  return err != 0 ? -err : a.max_splits;
}
