// CPU launcher of the rotary op: validates, dispatches on dtype, and runs the
// header-only kernel over tokens on ATen's OpenMP pool.
#include <ATen/Parallel.h>

#include "rotary_checks.h"
#include "rotary_cpu_kernel.h"

namespace yarn {
namespace {

template <typename Scalar, typename Kernel>
void run(const at::Tensor& positions, at::Tensor& query, std::optional<at::Tensor>& key,
         const at::Tensor& inv_freq, const std::optional<at::Tensor>& table,
         const RotaryProblem& p, int64_t head_size, double mscale, bool is_neox) {
  RotaryShape shape{p.num_tokens, p.q.num_heads, p.k.num_heads, static_cast<int>(head_size),
                    p.rotary_dim, p.q.token_stride, p.q.head_stride, p.k.token_stride,
                    p.k.head_stride, p.table_rows};
  auto* q = reinterpret_cast<Kernel*>(query.data_ptr<Scalar>());
  auto* k = key.has_value() ? reinterpret_cast<Kernel*>(key->data_ptr<Scalar>()) : nullptr;
  const float* tab = table.has_value() ? table->data_ptr<float>() : nullptr;
  const int64_t* pos = positions.data_ptr<int64_t>();
  const float* freq = inv_freq.data_ptr<float>();
  // A grain of a few tokens keeps single-token decode off the thread pool.
  const int64_t grain = std::max<int64_t>(1, 4096 / ((p.q.num_heads + p.k.num_heads) * head_size));
  at::parallel_for(0, p.num_tokens, grain, [&](int64_t begin, int64_t end) {
    rotary_cpu<Kernel>(begin, end, pos, q, k, freq, tab, shape, static_cast<float>(mscale),
                       is_neox);
  });
}

void rotary_embedding_cpu(const at::Tensor& positions, at::Tensor& query,
                          std::optional<at::Tensor> key, const at::Tensor& inv_freq,
                          const std::optional<at::Tensor>& cos_sin_table, double mscale,
                          int64_t head_size, bool is_neox) {
  const RotaryProblem p = check_rotary_args(positions, query, key, inv_freq, cos_sin_table,
                                            head_size);
  switch (query.scalar_type()) {
    case at::kFloat:
      run<float, float>(positions, query, key, inv_freq, cos_sin_table, p, head_size, mscale,
                        is_neox);
      break;
    case at::kHalf:
      run<at::Half, _Float16>(positions, query, key, inv_freq, cos_sin_table, p, head_size,
                              mscale, is_neox);
      break;
    default:
      run<at::BFloat16, bf16>(positions, query, key, inv_freq, cos_sin_table, p, head_size,
                              mscale, is_neox);
  }
}

}  // namespace

TORCH_LIBRARY_IMPL(yarn_vllm, CPU, m) { m.impl("rotary_embedding", &rotary_embedding_cpu); }

}  // namespace yarn
