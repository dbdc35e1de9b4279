// CUDA launcher of the rotary op: validates shapes, then calls the torch-free
// kernel on the current stream. It never reads tensor values on the host (no
// sync, CUDA-graph safe) except under YARN_VLLM_CHECK_ARGS=1. Built only where
// CUDA torch and nvcc exist.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "rotary_checks.h"
#include "rotary_cuda.h"

namespace yarn {
namespace {

void rotary_embedding_cuda(const RotaryCall& c) {
  const RotaryProblem& p = c.problem;
  if (c.scale_index.has_value() && debug_checks_enabled()) {
    const at::Tensor host = c.scale_index->cpu();
    check_scale_index_values(host.data_ptr<int32_t>(), p.num_tokens, p.num_scales);
  }
  const c10::cuda::CUDAGuard guard(c.query.device());
  RotaryCudaArgs a;
  a.dtype = c.query.scalar_type() == at::kFloat  ? DType::kFloat32
            : c.query.scalar_type() == at::kHalf ? DType::kFloat16
                                                 : DType::kBFloat16;
  a.positions = c.positions.data_ptr<int64_t>();
  a.scale_index = c.scale_index.has_value() ? c.scale_index->data_ptr<int32_t>() : nullptr;
  a.query = c.query.data_ptr();
  a.key = c.key.has_value() ? c.key->data_ptr() : nullptr;
  a.inv_freq = c.inv_freq.data_ptr<float>();
  a.mscale = c.mscale.data_ptr<float>();
  a.shape = RotaryCudaShape{p.num_tokens, p.q.num_heads, p.k.num_heads,
                            static_cast<int>(c.head_size), p.rotary_dim, p.q.token_stride,
                            p.q.head_stride, p.k.token_stride, p.k.head_stride,
                            static_cast<int>(p.num_scales)};
  a.is_neox = c.is_neox;
  const int err = rotary_cuda(a, c10::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(err == 0, "yarn_vllm rotary CUDA kernel failed with cudaError ", err);
}

}  // namespace

TORCH_LIBRARY_IMPL(yarn_vllm, CUDA, m) {
  m.impl("rotary_embedding", &rotary_embedding_op<rotary_embedding_cuda>);
}

}  // namespace yarn
