// Argument contract of the kv_cache_write op, shared by its CPU launcher and its Meta
// twin (bindings.cpp). Shapes, in int64 before any cast:
//   key, value    (T, H_kv, D) of kv_cache's dtype, channels contiguous, other strides free
//   kv_cache      (num_blocks, H_kv, block_size, 2 * D), contiguous: vLLM's CPU layout, whose
//                 (block, head) holds block_size keys of D then block_size values of D
//   slot_mapping  (T',) int64 contiguous; tokens t < min(T, T') are written to slot
//                 slot_mapping[t] (block slot / block_size, row slot % block_size); -1 skips
// Values (the CPU launcher; the Meta twin has none): every slot is -1 or in
// [0, num_blocks * block_size).
#pragma once

#include <ATen/ATen.h>
#include <torch/library.h>

#include "arg_checks.h"

namespace yarn {

struct CacheWriteProblem {
  int64_t tokens, heads, head_size, num_blocks, block_size;
};

inline CacheWriteProblem check_cache_write(const at::Tensor& key, const at::Tensor& value,
                                           const at::Tensor& kv_cache,
                                           const at::Tensor& slot_mapping) {
  TORCH_CHECK(kv_cache.dim() == 4 && kv_cache.is_contiguous(), "kv_cache: expected a contiguous "
              "(num_blocks, H_kv, block_size, 2 * D) tensor, got ", kv_cache.sizes());
  const auto dtype = kv_cache.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16,
              "kv_cache: dtype must be float32, float16 or bfloat16, got ", dtype);
  CacheWriteProblem p{key.dim() == 3 ? key.size(0) : 0, kv_cache.size(1), kv_cache.size(3) / 2,
                      kv_cache.size(0), kv_cache.size(2)};
  TORCH_CHECK(kv_cache.size(3) % 2 == 0 && p.head_size > 0 && p.heads > 0 && p.block_size > 0,
              "kv_cache: expected H_kv > 0 heads, block_size > 0 and an even last dim 2 * D > 0, "
              "got ", kv_cache.sizes());
  for (const at::Tensor* t : {&key, &value}) {
    const char* name = t == &key ? "key" : "value";
    TORCH_CHECK(t->dim() == 3 && t->size(0) == p.tokens && t->size(1) == p.heads &&
                    t->size(2) == p.head_size && t->stride(2) == 1,
                name, ": expected (T, H_kv=", p.heads, ", D=", p.head_size,
                ") with contiguous channels", t == &value ? " and key's T" : "", ", got ",
                t->sizes(), " strides ", t->strides());
    TORCH_CHECK(t->scalar_type() == dtype, name, ": dtype ", t->scalar_type(),
                " differs from kv_cache's ", dtype);
    TORCH_CHECK(t->device() == kv_cache.device(), name, ": on ", t->device(), ", kv_cache on ",
                kv_cache.device());
  }
  TORCH_CHECK(slot_mapping.scalar_type() == at::kLong && slot_mapping.dim() == 1 &&
                  slot_mapping.is_contiguous() && slot_mapping.device() == kv_cache.device(),
              "slot_mapping: expected a contiguous int64 (T',) tensor on kv_cache's device, got ",
              slot_mapping.scalar_type(), " ", slot_mapping.sizes());
  // num_blocks * block_size (and every slot below it) fits int64: torch refuses a tensor
  // (contiguous here) whose element count does not
  return p;
}

}  // namespace yarn
