// The argument contract of the paged_attention op, the one every implementation
// runs: the CPU and CUDA launchers, the Meta twin (torch.compile), the Triton
// wrapper (through the paged_attention_check op) and the CUDA emulation. No torch
// headers. Schema and semantics: bindings.cpp and yarn_vllm/attention/reference.py.
//
// Shapes (B sequences, T query tokens), checked on metadata alone:
//   out, query        (T, H_q, D), one float dtype, last dim contiguous, H_q, D > 0
//   key_cache,        (num_blocks, H_kv, block_size, D) of query's dtype, last dim
//   value_cache         contiguous, H_kv > 0 dividing H_q, block_size > 0
//   block_table       (B, max_blocks) int32, rows contiguous: B comes from here
//   seq_lens          (B,) int32;  query_start_loc (B + 1,) int32;  both contiguous
//   inv_freq          (B, rotary_dim / 2) fp32, rows contiguous, 0 < rotary_dim <= D
//   logit_scale       (B,) fp32 contiguous
//   cos_sin, cos_sin_start   both or neither: (rows, rotary_dim) fp32 and (B,) int64
//   max_blocks * block_size <= kMaxContext, so positions and lengths fit int32
//   H_q <= kMaxHeads, D <= kMaxHeadSize, T x H_q < 2^31, B < 2^31 - 1: the kernels'
//   int indices; expanded (stride-0) inputs are refused past them, never wrapped
// Values, checked where they can be read (CPU always; CUDA under YARN_VLLM_CHECK_ARGS=1):
//   query_start_loc starts at 0, never decreases and ends at or before T;
//   0 <= q_len_b <= seq_lens[b] <= max_blocks * block_size;
//   the blocks sequence b uses (its first ceil(seq_len / block_size) entries) lie in
//   [0, num_blocks): entries past them are never read and may hold anything;
//   logit_scale is finite; cos_sin_start[b] + 32 + ceil(seq_lens[b] / 32) <= rows.
#pragma once

#include <cmath>
#include <cstdint>

#include "arg_checks.h"

namespace yarn {

constexpr int kAngleStride = 32;  // positions per coarse row of the angle table (== fine rows)
constexpr int64_t kMaxContext = (int64_t{1} << 31) - (int64_t{1} << 16);
constexpr int64_t kMaxHeadSize = 1024;  // channels a head: as the rotary op's rotary_dim

struct PagedArgs {
  ArgTensor out, query, key_cache, value_cache, block_table, seq_lens, query_start_loc,
      inv_freq, logit_scale, cos_sin, cos_sin_start;
};

struct PagedProblem {
  int64_t num_seqs, num_tokens, num_q_heads, num_kv_heads, head_size, rotary_dim, block_size,
      num_blocks, max_blocks;
};

namespace detail {

inline bool is_float(ArgDType t) {
  return t == ArgDType::kFloat32 || t == ArgDType::kFloat16 || t == ArgDType::kBFloat16;
}

inline void same_device(const ArgTensor& t, const ArgTensor& query) {
  YARN_ARG_CHECK(t.device == query.device, t.name, ": on ", t.device, ", query on ",
                 query.device);
}

inline void check_vector(const ArgTensor& t, ArgDType dtype, int64_t n, const ArgTensor& query) {
  YARN_ARG_CHECK(t.dtype == dtype, t.name, ": expected ", dtype_name(dtype), ", got ",
                 t.type());
  YARN_ARG_CHECK(t.dim == 1 && t.size[0] == n && t.contiguous(), t.name,
                 ": expected a contiguous (", n, ",) tensor, got ", t.shape());
  same_device(t, query);
}

inline void check_cache(const ArgTensor& c, const ArgTensor& query) {
  YARN_ARG_CHECK(c.dim == 4, c.name, ": expected (num_blocks, H_kv, block_size, D), got ",
                 c.shape());
  YARN_ARG_CHECK(c.dtype == query.dtype, c.name, ": dtype ", c.type(),
                 " differs from query's ", query.type());
  YARN_ARG_CHECK(c.size[3] == query.size[2], c.name, ": head size ", c.size[3], " != query's ",
                 query.size[2]);
  YARN_ARG_CHECK(c.stride[3] == 1, c.name, ": the head dimension must be contiguous");
  same_device(c, query);
}

}  // namespace detail

inline PagedProblem check_paged_shapes(const PagedArgs& a) {
  using detail::check_vector;
  const ArgTensor& q = a.query;
  YARN_ARG_CHECK(q.dim == 3 && q.stride[2] == 1, "query: expected (T, H_q, D) with a contiguous "
                 "last dim, got ", q.shape());
  detail::check_cache(a.key_cache, q);
  YARN_ARG_CHECK(detail::is_float(q.dtype), "query: dtype must be float32, float16 or bfloat16, "
                 "got ", q.type());
  YARN_ARG_CHECK(q.size[1] > 0 && q.size[2] > 0, "query: expected H_q > 0 heads of D > 0, got ",
                 q.shape());
  // The kernels index heads, channels and query rows (token x head) with int, and keep
  // a work item's rows (up to max(64, H_q)) x D in scratch: bounded before any product.
  YARN_ARG_CHECK(q.size[1] <= kMaxHeads && q.size[2] <= kMaxHeadSize, "query: ", q.size[1],
                 " heads of ", q.size[2], " channels; expected at most ", kMaxHeads,
                 " heads of at most ", kMaxHeadSize);
  YARN_ARG_CHECK(q.size[0] <= kMaxIndex / q.size[1], "query: ", q.size[0], " tokens of ",
                 q.size[1], " heads; expected at most ", kMaxIndex, " rows (tokens x heads)");
  const ArgTensor& o = a.out;
  YARN_ARG_CHECK(o.dim == 3 && o.size[0] == q.size[0] && o.size[1] == q.size[1] &&
                     o.size[2] == q.size[2] && o.dtype == q.dtype && o.stride[2] == 1,
                 "out: expected query's shape ", q.shape(), " and dtype ", q.type(),
                 " with a contiguous last dim, got ", o.shape(), " ", o.type());
  detail::same_device(o, q);
  const ArgTensor& kc = a.key_cache;
  detail::check_cache(a.value_cache, q);
  for (int i = 0; i < 4; ++i)
    YARN_ARG_CHECK(a.value_cache.size[i] == kc.size[i], "value_cache: shape ",
                   a.value_cache.shape(), " differs from key_cache's ", kc.shape());
  YARN_ARG_CHECK(kc.size[1] > 0 && q.size[1] % kc.size[1] == 0, "key_cache: ", kc.size[1],
                 " kv heads; expected a positive divisor of query's ", q.size[1], " heads");
  YARN_ARG_CHECK(kc.size[2] > 0 && kc.size[2] <= kMaxContext, "key_cache: block size ",
                 kc.size[2], "; expected 1 to ", kMaxContext);

  const ArgTensor& bt = a.block_table;
  YARN_ARG_CHECK(bt.dtype == ArgDType::kInt32, "block_table: expected int32, got ",
                 bt.type());
  YARN_ARG_CHECK(bt.dim == 2 && (bt.stride[1] == 1 || bt.size[1] <= 1),
                 "block_table: expected (B, max_blocks) with contiguous rows, got ", bt.shape());
  detail::same_device(bt, q);
  PagedProblem p{bt.size[0], q.size[0], q.size[1], kc.size[1], q.size[2], 0, kc.size[2],
                 kc.size[0], bt.size[1]};
  YARN_ARG_CHECK(p.num_seqs < kMaxIndex, "block_table: ", p.num_seqs, " sequences; expected "
                 "fewer than ", kMaxIndex);
  // max_blocks * block_size <= kMaxContext, asked without forming the product (it can wrap)
  YARN_ARG_CHECK(p.max_blocks <= kMaxContext / p.block_size, "block_table: ", p.max_blocks,
                 " blocks of ", p.block_size, " tokens exceed the longest context, ", kMaxContext);
  check_vector(a.seq_lens, ArgDType::kInt32, p.num_seqs, q);
  check_vector(a.query_start_loc, ArgDType::kInt32, p.num_seqs + 1, q);

  const ArgTensor& f = a.inv_freq;
  YARN_ARG_CHECK(f.dtype == ArgDType::kFloat32 && f.dim == 2 && f.size[0] == p.num_seqs &&
                     (f.stride[1] == 1 || f.size[1] <= 1),
                 "inv_freq: expected fp32 (B=", p.num_seqs, ", rotary_dim / 2) with contiguous "
                 "rows, got ", f.type(), " ", f.shape());
  detail::same_device(f, q);
  YARN_ARG_CHECK(f.size[1] > 0 && f.size[1] <= p.head_size / 2, "inv_freq: ", f.size[1],
                 " frequencies (rotary_dim / 2) must be in (0, head_size / 2 = ",
                 p.head_size / 2, "]");
  p.rotary_dim = f.size[1] * 2;
  check_vector(a.logit_scale, ArgDType::kFloat32, p.num_seqs, q);

  YARN_ARG_CHECK(a.cos_sin.present == a.cos_sin_start.present,
                 "cos_sin, cos_sin_start: pass both or neither");
  if (a.cos_sin.present) {
    const ArgTensor& t = a.cos_sin;
    YARN_ARG_CHECK(t.dtype == ArgDType::kFloat32 && t.dim == 2 && t.size[1] == p.rotary_dim &&
                       t.contiguous(),
                   "cos_sin: expected contiguous fp32 (rows, rotary_dim=", p.rotary_dim,
                   "), got ", t.type(), " ", t.shape());
    detail::same_device(t, q);
    check_vector(a.cos_sin_start, ArgDType::kInt64, p.num_seqs, q);
  }
  return p;
}

// Needs host-readable block_table, seq_lens, query_start_loc, logit_scale (and
// cos_sin_start when present); all arithmetic in int64.
inline void check_paged_values(const PagedArgs& a, const PagedProblem& p) {
  for (const ArgTensor* t : {&a.block_table, &a.seq_lens, &a.query_start_loc, &a.logit_scale})
    YARN_ARG_CHECK(t->host, t->name, ": values are not readable on the host");
  const int32_t* starts = a.query_start_loc.values<int32_t>();
  const int32_t* lens = a.seq_lens.values<int32_t>();
  const float* scale = a.logit_scale.values<float>();
  YARN_ARG_CHECK(p.num_seqs == 0 || starts[0] == 0, "query_start_loc: starts at ", starts[0],
                 "; expected 0");
  YARN_ARG_CHECK(starts[p.num_seqs] <= p.num_tokens, "query_start_loc: ends at ",
                 starts[p.num_seqs], ", past query's ", p.num_tokens, " rows");
  const int64_t capacity = p.max_blocks * p.block_size;
  for (int64_t b = 0; b < p.num_seqs; ++b) {
    const int64_t q_len = int64_t{starts[b + 1]} - starts[b];
    const int64_t seq_len = lens[b];
    YARN_ARG_CHECK(q_len >= 0, "query_start_loc: decreases at sequence ", b, " (", starts[b],
                   " then ", starts[b + 1], ")");
    YARN_ARG_CHECK(q_len <= seq_len, "seq_lens: sequence ", b, " has ", seq_len,
                   " tokens but ", q_len, " queries");
    YARN_ARG_CHECK(seq_len <= capacity, "seq_lens: sequence ", b, " has ", seq_len,
                   " tokens, more than block_table's ", p.max_blocks, " blocks of ",
                   p.block_size, " hold");
    YARN_ARG_CHECK(std::isfinite(scale[b]), "logit_scale: sequence ", b, " has ", scale[b],
                   "; expected a finite value");
    const int32_t* row = a.block_table.values<int32_t>() + b * a.block_table.stride[0];
    const int64_t used = (seq_len + p.block_size - 1) / p.block_size;
    for (int64_t i = 0; i < used; ++i)
      YARN_ARG_CHECK(row[i] >= 0 && row[i] < p.num_blocks, "block_table: sequence ", b,
                     " uses block ", row[i], " (entry ", i, ") outside the cache's ",
                     p.num_blocks, " blocks");
  }
  if (a.cos_sin.present) {
    YARN_ARG_CHECK(a.cos_sin_start.host, "cos_sin_start: values are not readable on the host");
    const int64_t* first = a.cos_sin_start.values<int64_t>();
    for (int64_t b = 0; b < p.num_seqs; ++b) {
      const int64_t rows = kAngleStride + (int64_t{lens[b]} + kAngleStride - 1) / kAngleStride;
      YARN_ARG_CHECK(first[b] >= 0 && first[b] <= a.cos_sin.size[0] - rows, "cos_sin_start: "
                     "sequence ", b, " reads rows [", first[b], ", ", first[b] + rows,
                     ") of cos_sin's ", a.cos_sin.size[0]);
    }
  }
}

}  // namespace yarn
