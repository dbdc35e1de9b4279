// CUDA launcher of the rotary op: validates, then calls the torch-free kernel
// on the current stream. Built only where CUDA torch and nvcc exist.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "rotary_checks.h"
#include "rotary_cuda.h"

namespace yarn {
namespace {

void rotary_embedding_cuda(const at::Tensor& positions, at::Tensor& query,
                           std::optional<at::Tensor> key, const at::Tensor& inv_freq,
                           const std::optional<at::Tensor>& cos_sin_table, double mscale,
                           int64_t head_size, bool is_neox) {
  const RotaryProblem p = check_rotary_args(positions, query, key, inv_freq, cos_sin_table,
                                            head_size);
  const c10::cuda::CUDAGuard guard(query.device());
  RotaryCudaArgs a;
  a.dtype = query.scalar_type() == at::kFloat  ? DType::kFloat32
            : query.scalar_type() == at::kHalf ? DType::kFloat16
                                               : DType::kBFloat16;
  a.positions = positions.data_ptr<int64_t>();
  a.query = query.data_ptr();
  a.key = key.has_value() ? key->data_ptr() : nullptr;
  a.inv_freq = inv_freq.data_ptr<float>();
  a.table = cos_sin_table.has_value() ? cos_sin_table->data_ptr<float>() : nullptr;
  a.shape = RotaryCudaShape{p.num_tokens, p.q.num_heads, p.k.num_heads,
                            static_cast<int>(head_size), p.rotary_dim, p.q.token_stride,
                            p.q.head_stride, p.k.token_stride, p.k.head_stride,
                            p.table_rows};
  a.mscale = static_cast<float>(mscale);
  a.is_neox = is_neox;
  const int err = rotary_cuda(a, c10::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(err == 0, "yarn_vllm rotary CUDA kernel failed with cudaError ", err);
}

}  // namespace

TORCH_LIBRARY_IMPL(yarn_vllm, CUDA, m) { m.impl("rotary_embedding", &rotary_embedding_cuda); }

}  // namespace yarn
