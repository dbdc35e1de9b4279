// Argument checks of the rotary op, shared by its CPU and CUDA launchers and its
// Meta twin (bindings.cpp). Contract: the schema comment in bindings.cpp.
#pragma once

#include <torch/library.h>
#include <ATen/ATen.h>

#include "arg_checks.h"

namespace yarn {

// Sizes and element strides of q or k viewed as (num_tokens, num_heads, head_size).
struct HeadsView {
  int num_heads = 0;
  int64_t token_stride = 0, head_stride = 0;
};

// q / k: (num_tokens, H * head_size) or (num_tokens, H, head_size), H > 0; the
// token stride may be anything (vLLM passes slices of a fused qkv tensor), the
// channel stride must be 1.
inline HeadsView heads_view(const at::Tensor& x, const char* name, int64_t num_tokens,
                            int64_t head_size) {
  TORCH_CHECK(x.dim() == 2 || x.dim() == 3, name, ": expected 2 or 3 dims, got ", x.sizes());
  TORCH_CHECK(x.size(0) == num_tokens, name, ": ", x.size(0), " tokens but ", num_tokens,
              " positions");
  TORCH_CHECK(x.stride(-1) == 1, name, ": the last dimension must be contiguous");
  HeadsView v;
  v.token_stride = x.stride(0);
  int64_t heads;  // counted in int64: an expanded (stride-0) head dim can have any size
  if (x.dim() == 2) {
    TORCH_CHECK(x.size(1) % head_size == 0, name, ": width ", x.size(1),
                " is not a multiple of head_size ", head_size);
    heads = x.size(1) / head_size;
    v.head_stride = head_size;
  } else {
    TORCH_CHECK(x.size(2) == head_size, name, ": last dim ", x.size(2), " != head_size ",
                head_size);
    heads = x.size(1);
    v.head_stride = x.stride(1);
  }
  TORCH_CHECK(heads > 0 && heads <= kMaxHeads, name, ": ", heads, " heads of head_size ",
              head_size, " in ", x.sizes(), "; pass 1 to ", kMaxHeads,
              " heads (or None for the key)");
  v.num_heads = static_cast<int>(heads);
  return v;
}

struct RotaryProblem {
  int64_t num_tokens;
  int rotary_dim;
  int64_t num_scales;
  HeadsView q, k;
};

inline RotaryProblem check_rotary_args(const at::Tensor& positions, const at::Tensor& query,
                                       const std::optional<at::Tensor>& key,
                                       const at::Tensor& inv_freq, const at::Tensor& mscale,
                                       const std::optional<at::Tensor>& scale_index,
                                       int64_t head_size) {
  TORCH_CHECK(head_size > 0 && head_size <= kMaxIndex, "head_size: ", head_size,
              "; expected > 0 and at most ", kMaxIndex);
  TORCH_CHECK(positions.scalar_type() == at::kLong, "positions: expected int64, got ",
              positions.scalar_type());
  TORCH_CHECK(positions.is_contiguous(), "positions: must be contiguous");
  TORCH_CHECK(inv_freq.scalar_type() == at::kFloat && inv_freq.dim() == 2 &&
                  inv_freq.size(0) >= 1 && inv_freq.is_contiguous(),
              "inv_freq: expected a contiguous fp32 (num_scales >= 1, rotary_dim / 2) tensor, "
              "got ", inv_freq.scalar_type(), " ", inv_freq.sizes());
  RotaryProblem p;
  p.num_tokens = positions.numel();
  p.num_scales = inv_freq.size(0);
  TORCH_CHECK(p.num_scales <= kMaxIndex, "inv_freq: ", p.num_scales, " rows; scale_index "
              "(int32) reaches at most ", kMaxIndex);
  const int64_t pairs = inv_freq.size(1);  // a contiguous row of them: no product can wrap
  TORCH_CHECK(pairs > 0 && 2 * pairs <= head_size && 2 * pairs <= 1024, "rotary_dim ",
              2 * pairs, " must be in (0, min(head_size=", head_size, ", 1024)]");
  p.rotary_dim = static_cast<int>(2 * pairs);
  TORCH_CHECK(mscale.scalar_type() == at::kFloat && mscale.dim() == 1 &&
                  mscale.size(0) == p.num_scales && mscale.is_contiguous(),
              "mscale: expected a contiguous fp32 (", p.num_scales, ",) tensor, one per "
              "inv_freq row, got ", mscale.scalar_type(), " ", mscale.sizes());
  if (scale_index.has_value()) {
    TORCH_CHECK(scale_index->scalar_type() == at::kInt && scale_index->dim() == 1 &&
                    scale_index->size(0) == p.num_tokens && scale_index->is_contiguous(),
                "scale_index: expected a contiguous int32 (", p.num_tokens, ",) tensor, got ",
                scale_index->scalar_type(), " ", scale_index->sizes());
    TORCH_CHECK(scale_index->device() == query.device(), "scale_index: on another device");
  }
  auto dtype = query.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16,
              "query: dtype must be float32, float16 or bfloat16, got ", dtype);
  p.q = heads_view(query, "query", p.num_tokens, head_size);
  if (key.has_value()) {
    TORCH_CHECK(key->scalar_type() == dtype, "key: dtype ", key->scalar_type(),
                " differs from query's ", dtype);
    TORCH_CHECK(key->device() == query.device(), "key: on a different device from query");
    p.k = heads_view(*key, "key", p.num_tokens, head_size);
  }
  TORCH_CHECK(positions.device() == query.device() && inv_freq.device() == query.device() &&
                  mscale.device() == query.device(),
              "positions, query, inv_freq and mscale must be on one device");
  return p;
}

// The rotary op's arguments as an implementation receives them, its contract checked.
struct RotaryCall {
  const at::Tensor& positions;
  at::Tensor& query;
  std::optional<at::Tensor>& key;
  const at::Tensor& inv_freq;
  const at::Tensor& mscale;
  const std::optional<at::Tensor>& scale_index;
  int64_t head_size;
  bool is_neox;
  RotaryProblem problem;
};

// The op as registered for one dispatch key (the schema's signature, written once): checks
// the contract, then runs `Impl` (the CPU or CUDA launcher; nothing for the Meta twin).
template <void (*Impl)(const RotaryCall&)>
void rotary_embedding_op(const at::Tensor& positions, at::Tensor& query,
                         std::optional<at::Tensor> key, const at::Tensor& inv_freq,
                         const at::Tensor& mscale, const std::optional<at::Tensor>& scale_index,
                         int64_t head_size, bool is_neox) {
  Impl(RotaryCall{positions, query, key, inv_freq, mscale, scale_index, head_size, is_neox,
                  check_rotary_args(positions, query, key, inv_freq, mscale, scale_index,
                                    head_size)});
}

// Every scale_index value must pick a row of inv_freq. `index` must be host memory.
inline void check_scale_index_values(const int32_t* index, int64_t num_tokens,
                                     int64_t num_scales) {
  for (int64_t t = 0; t < num_tokens; ++t)
    TORCH_CHECK(index[t] >= 0 && index[t] < num_scales, "scale_index: token ", t, " has ",
                index[t], ", outside the ", num_scales, " rows of inv_freq");
}

}  // namespace yarn
