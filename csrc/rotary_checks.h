// Argument checks shared by the CPU and CUDA launchers of the rotary op.
#pragma once

#include <torch/library.h>
#include <ATen/ATen.h>

namespace yarn {

// Sizes and element strides of q or k viewed as (num_tokens, num_heads, head_size).
struct HeadsView {
  int num_heads = 0;
  int64_t token_stride = 0, head_stride = 0;
};

// q / k: (num_tokens, H * head_size) or (num_tokens, H, head_size); the token
// stride may be anything (vLLM passes slices of a fused qkv tensor), the
// channel stride must be 1.
inline HeadsView heads_view(const at::Tensor& x, const char* name, int64_t num_tokens,
                            int64_t head_size) {
  TORCH_CHECK(x.dim() == 2 || x.dim() == 3, name, ": expected 2 or 3 dims, got ", x.sizes());
  TORCH_CHECK(x.size(0) == num_tokens, name, ": ", x.size(0), " tokens but ", num_tokens,
              " positions");
  TORCH_CHECK(x.stride(-1) == 1, name, ": the last dimension must be contiguous");
  HeadsView v;
  v.token_stride = x.stride(0);
  if (x.dim() == 2) {
    TORCH_CHECK(x.size(1) % head_size == 0, name, ": width ", x.size(1),
                " is not a multiple of head_size ", head_size);
    v.num_heads = static_cast<int>(x.size(1) / head_size);
    v.head_stride = head_size;
  } else {
    TORCH_CHECK(x.size(2) == head_size, name, ": last dim ", x.size(2), " != head_size ",
                head_size);
    v.num_heads = static_cast<int>(x.size(1));
    v.head_stride = x.stride(1);
  }
  return v;
}

struct RotaryProblem {
  int64_t num_tokens;
  int rotary_dim;
  HeadsView q, k;
  int64_t table_rows = 0;
};

inline RotaryProblem check_rotary_args(const at::Tensor& positions, const at::Tensor& query,
                                       const std::optional<at::Tensor>& key,
                                       const at::Tensor& inv_freq,
                                       const std::optional<at::Tensor>& table,
                                       int64_t head_size) {
  TORCH_CHECK(positions.scalar_type() == at::kLong, "positions: expected int64, got ",
              positions.scalar_type());
  TORCH_CHECK(positions.is_contiguous(), "positions: must be contiguous");
  TORCH_CHECK(inv_freq.scalar_type() == at::kFloat && inv_freq.dim() == 1 &&
                  inv_freq.is_contiguous(), "inv_freq: expected a contiguous 1-D fp32 tensor");
  auto dtype = query.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16,
              "query: dtype must be float32, float16 or bfloat16, got ", dtype);
  RotaryProblem p;
  p.num_tokens = positions.numel();
  p.rotary_dim = static_cast<int>(2 * inv_freq.size(0));
  TORCH_CHECK(p.rotary_dim > 0 && p.rotary_dim <= head_size && p.rotary_dim <= 1024,
              "rotary_dim ", p.rotary_dim, " must be in (0, min(head_size=", head_size,
              ", 1024)]");
  p.q = heads_view(query, "query", p.num_tokens, head_size);
  if (key.has_value()) {
    TORCH_CHECK(key->scalar_type() == dtype, "key: dtype ", key->scalar_type(),
                " differs from query's ", dtype);
    TORCH_CHECK(key->device() == query.device(), "key: on a different device from query");
    p.k = heads_view(*key, "key", p.num_tokens, head_size);
  }
  TORCH_CHECK(positions.device() == query.device() && inv_freq.device() == query.device(),
              "positions, query and inv_freq must be on one device");
  if (table.has_value()) {
    TORCH_CHECK(table->scalar_type() == at::kFloat && table->dim() == 2 &&
                    table->size(1) == p.rotary_dim && table->is_contiguous(),
                "cos_sin_table: expected contiguous fp32 (max_position, rotary_dim)");
    TORCH_CHECK(table->device() == query.device(), "cos_sin_table: on another device");
    p.table_rows = table->size(0);
  }
  return p;
}

}  // namespace yarn
