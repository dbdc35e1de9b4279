// CPU launcher of the rotary op: validates (scale_index values included),
// dispatches on dtype, and runs the header-only kernel over tokens on ATen's
// OpenMP pool.
#include <ATen/Parallel.h>

#include "rotary_checks.h"
#include "rotary_cpu_kernel.h"

namespace yarn {
namespace {

// Rotation pairs a thread should get before forking pays: an OpenMP fork and
// join costs a few microseconds, about what rotating this many pairs takes.
constexpr int64_t kPairsPerThread = 16384;

template <typename Scalar, typename Kernel>
void run(const RotaryCall& c) {
  const RotaryProblem& p = c.problem;
  const RotaryShape shape{p.num_tokens, p.q.num_heads, p.k.num_heads,
                          static_cast<int>(c.head_size), p.rotary_dim, p.q.token_stride,
                          p.q.head_stride, p.k.token_stride, p.k.head_stride};
  auto* q = reinterpret_cast<Kernel*>(c.query.data_ptr<Scalar>());
  auto* k = c.key.has_value() ? reinterpret_cast<Kernel*>(c.key->data_ptr<Scalar>()) : nullptr;
  const int64_t* pos = c.positions.data_ptr<int64_t>();
  const int32_t* index = c.scale_index.has_value() ? c.scale_index->data_ptr<int32_t>() : nullptr;
  const float* freq = c.inv_freq.data_ptr<float>();
  const float* ms = c.mscale.data_ptr<float>();
  const int64_t pairs_per_token = int64_t{p.q.num_heads + p.k.num_heads} * (p.rotary_dim / 2);
  const int64_t grain = std::max<int64_t>(1, kPairsPerThread / pairs_per_token);
  const bool is_neox = c.is_neox;
  at::parallel_for(0, p.num_tokens, grain, [&](int64_t begin, int64_t end) {
    rotary_cpu<Kernel>(begin, end, pos, index, q, k, freq, ms, shape, is_neox);
  });
}

void rotary_embedding_cpu(const RotaryCall& c) {
  if (c.scale_index.has_value())
    check_scale_index_values(c.scale_index->data_ptr<int32_t>(), c.problem.num_tokens,
                             c.problem.num_scales);
  switch (c.query.scalar_type()) {
    case at::kFloat: run<float, float>(c); break;
    case at::kHalf: run<at::Half, _Float16>(c); break;
    default: run<at::BFloat16, bf16>(c);
  }
}

}  // namespace

TORCH_LIBRARY_IMPL(yarn_vllm, CPU, m) {
  m.impl("rotary_embedding", &rotary_embedding_op<rotary_embedding_cpu>);
}

}  // namespace yarn
