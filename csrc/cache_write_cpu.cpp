// CPU launcher of kv_cache_write: the step's keys and values (before RoPE, for Dynamic
// YaRN) into vLLM's CPU paged cache, one call per layer. Contract: cache_write_checks.h.
#include <ATen/Parallel.h>

#include <cstring>

#include "cache_write_checks.h"

namespace yarn {
namespace {

void kv_cache_write_cpu(const at::Tensor& key, const at::Tensor& value, at::Tensor& kv_cache,
                        const at::Tensor& slot_mapping) {
  const CacheWriteProblem p = check_cache_write(key, value, kv_cache, slot_mapping);
  const int64_t n = std::min(p.tokens, slot_mapping.size(0));
  const int64_t* slots = slot_mapping.data_ptr<int64_t>();
  const int64_t capacity = p.num_blocks * p.block_size;  // bounded by the contract
  for (int64_t t = 0; t < n; ++t)
    TORCH_CHECK(slots[t] >= -1 && slots[t] < capacity, "slot_mapping: token ", t, " has slot ",
                slots[t], ", outside the cache's ", capacity, " (or -1 to skip)");
  const int64_t D = p.head_size, bytes = D * static_cast<int64_t>(kv_cache.element_size());
  auto* cache = static_cast<char*>(kv_cache.data_ptr());
  const auto* k = static_cast<const char*>(key.data_ptr());
  const auto* v = static_cast<const char*>(value.data_ptr());
  const int64_t elem = kv_cache.element_size();
  // element strides of the cache: per block, per head; K then V halves of block_size rows
  const int64_t head_elems = 2 * p.block_size * D, block_elems = p.heads * head_elems;
  // a decode step writes a token or few: a fork would cost more than the copies
  const int64_t grain = std::max<int64_t>(1, 4096 / (p.heads * 2));
  at::parallel_for(0, n, grain, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t slot = slots[t];
      if (slot < 0) continue;
      const int64_t block = slot / p.block_size, row = slot % p.block_size;
      for (int64_t h = 0; h < p.heads; ++h) {
        char* dst = cache + (block * block_elems + h * head_elems + row * D) * elem;
        std::memcpy(dst, k + (t * key.stride(0) + h * key.stride(1)) * elem, bytes);
        std::memcpy(dst + p.block_size * D * elem,
                    v + (t * value.stride(0) + h * value.stride(1)) * elem, bytes);
      }
    }
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(yarn_vllm, CPU, m) { m.impl("kv_cache_write", &kv_cache_write_cpu); }

}  // namespace yarn
