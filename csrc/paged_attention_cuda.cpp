// CUDA launcher of the pre-RoPE paged attention op, for decode batches (one
// query token per sequence): checks the op's contract (paged_attention_checks.h;
// values only under YARN_VLLM_CHECK_ARGS=1, as reading them costs a host sync),
// sizes the split workspace, then calls the torch-free kernel on the current
// stream. Prefill and mixed batches are served by the Triton kernel
// (yarn_vllm/attention/paged.py routes them); this implementation refuses them
// rather than guess.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>
#include <torch/library.h>

#include "paged_attention_cuda.h"
#include "torch_args.h"

namespace yarn {
namespace {

int num_sms(int device) {
  int n = 0;
  cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, device);
  return n > 0 ? n : 1;
}

// cos_sin / cos_sin_start (the CPU kernel's coarse x fine angle table) are
// checked but not read: the kernel forms each angle as pos * inv_freq[b, j] in
// fp32 and takes sincosf of it, the reference's own definition, and on a GPU
// that is cheaper than reading table rows next to every key.
void paged_attention_cuda(const PagedOp& op) {
  const PagedCall& call = op.checked;
  const at::Tensor& query = op.query;
  PagedDecodeArgs a =
      as_torch_error([&] { return decode_args(call.args, call.problem, op.is_neox); });
  const c10::cuda::CUDAGuard guard(query.device());
  // The block table's width bounds every sequence's length without a device
  // sync; splits past a sequence's own length exit at once.
  const int64_t max_context = call.problem.max_blocks * call.problem.block_size;
  a.max_splits = paged_decode_splits(a.num_seqs, a.num_q_heads, a.num_kv_heads, max_context,
                                     num_sms(query.get_device()));
  at::Tensor workspace;
  if (a.max_splits > 1) {
    const int64_t rows = static_cast<int64_t>(a.num_seqs) * a.num_q_heads * a.max_splits;
    workspace = at::empty({rows * (a.head_size + 2)}, query.options().dtype(at::kFloat));
    a.partial_out = workspace.data_ptr<float>();
    a.partial_max = a.partial_out + rows * a.head_size;
    a.partial_sum = a.partial_max + rows;
  }
  const int err = paged_decode_cuda(a, c10::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(err == 0, "yarn_vllm paged_attention CUDA kernel failed with cudaError ", err);
}

}  // namespace

// values only under YARN_VLLM_CHECK_ARGS=1 (a host sync), then the decode kernel's own limits
constexpr PagedValueChecks kDecodeChecks{on_request, check_decode_values};

TORCH_LIBRARY_IMPL(yarn_vllm, CUDA, m) {
  m.impl("paged_attention", &paged_attention_op<paged_attention_cuda, kDecodeChecks>);
}

}  // namespace yarn
