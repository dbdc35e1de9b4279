"""The CPU paged attention kernel built for each instruction set it has a path for.

The extension is built with -march=native, so a machine runs only its own paths (here
AVX-512 with AVX512-BF16: bf16 prefill tiles take bf16 dot products). This compiles
csrc/paged_attention_cpu_kernel.h again for AVX-512 without BF16 (x86-64-v4: fp32
products at 16 lanes for bf16 data too), for AVX2 alone (x86-64-v3: 8 lanes) and for
plain x86-64 (the portable loop), and checks each against the float64 reference over
prefill tiles (rows vectorised) and decode (keys vectorised), per-sequence scales included.
"""

from __future__ import annotations

import ctypes
import shutil

import pytest
import torch

from test_dynamic_attention import _batch, _reference
from test_rotary_isa import build_isas
from yarn_vllm.attention.angles import angle_table

ISAS = {"avx512_no_bf16": "-march=x86-64-v4", "avx2": "-march=x86-64-v3", "scalar": "-march=x86-64"}
# fp32 products in every build here: the reference's rounding plus fp32 sums
FP32 = dict(rtol=1e-4, atol=2e-5)
BF16 = dict(rtol=2 ** -7, atol=2e-3)  # the output rounded to bf16, on fp32 products
SHIM = r"""
#include "paged_attention_cpu_kernel.h"
// One sequence b of a batch, every kv head as one work item over all its queries and keys,
// normalised into out (T, H_q, D) fp32, as the launcher's write_rows does.
template <typename T>
static void run(const void* q, const void* kc, const void* vc, const int64_t* st, const int32_t* blocks,
                const int* dims, const float* cos_sin, const float* inv_freq, float logit_scale,
                float* out) {
  yarn::PagedShape sh{dims[0], dims[1], dims[2], dims[3], dims[4], true,
                      st[0], st[1], st[2], st[3], st[4], st[2], st[3], st[4]};
  const int seq_len = dims[5], q_len = dims[6], group = dims[0] / dims[1], D = dims[2];
  yarn::PagedSequence seq{blocks, seq_len, q_len, 0, logit_scale, cos_sin, inv_freq};
  yarn::Scratch scratch;
  yarn::SoftmaxState state;
  for (int h = 0; h < dims[1]; ++h) {
    state.reset(q_len * group, D);
    yarn::paged_attend<T>(sh, seq, static_cast<const T*>(q), static_cast<const T*>(kc),
                          static_cast<const T*>(vc), h, 0, q_len, 0, seq_len, state, scratch);
    for (int i = 0; i < q_len; ++i)
      for (int g = 0; g < group; ++g) {
        const int r = i * group + g;
        for (int d = 0; d < D; ++d)
          out[(static_cast<int64_t>(i) * dims[0] + h * group + g) * D + d] =
              state.acc[static_cast<size_t>(r) * D + d] / state.l[r];
      }
  }
}
extern "C" void attend_f32(const void* q, const void* kc, const void* vc, const int64_t* st,
                           const int32_t* b, const int* dims, const float* cs, const float* f,
                           float s, float* out) { run<float>(q, kc, vc, st, b, dims, cs, f, s, out); }
extern "C" void attend_bf16(const void* q, const void* kc, const void* vc, const int64_t* st,
                            const int32_t* b, const int* dims, const float* cs, const float* f,
                            float s, float* out) { run<yarn::bf16>(q, kc, vc, st, b, dims, cs, f, s, out); }
"""

pytestmark = pytest.mark.skipif(shutil.which("g++") is None, reason="g++ not on PATH")


@pytest.fixture(scope="module")
def kernels(tmp_path_factory):
    return build_isas(tmp_path_factory.mktemp("paged_isa"), SHIM, ISAS, std="c++20")


def attend(lib, b, seq: int) -> torch.Tensor:
    """Sequence `seq` of batch `b` through `lib`'s kernel: its rows of the output, fp32."""
    ptr = lambda t: ctypes.c_void_p(t.data_ptr())  # noqa: E731
    q0, q1 = int(b["query_start_loc"][seq]), int(b["query_start_loc"][seq + 1])
    query = b["query"][q0:q1].contiguous()
    kc, vc = b["key_cache"], b["value_cache"]
    assert kc.stride() == vc.stride()
    lens = b["seq_lens"][seq:seq + 1].tolist()
    cos_sin, _ = angle_table(lens, b["inv_freq"][seq:seq + 1])
    strides = torch.tensor([query.stride(0), query.stride(1), *kc.stride()[:3]], dtype=torch.int64)
    dims = torch.tensor([query.shape[1], kc.shape[1], query.shape[2], 2 * b["inv_freq"].shape[1],
                         kc.shape[2], lens[0], q1 - q0], dtype=torch.int32)
    blocks = b["block_table"][seq].contiguous()
    freq = b["inv_freq"][seq].contiguous()
    out = torch.empty(query.shape, dtype=torch.float32)
    fn = lib.attend_f32 if query.dtype == torch.float32 else lib.attend_bf16
    fn(ptr(query), ptr(kc), ptr(vc), ptr(strides), ptr(blocks), ptr(dims), ptr(cos_sin),
       ptr(freq), ctypes.c_float(float(b["logit_scale"][seq])), ptr(out))
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("head,rotary,q_heads,kv_heads", [(64, 64, 9, 3), (80, 80, 4, 2),
                                                          (128, 64, 2, 2)], ids=str)
def test_every_isa_agrees_with_the_reference(kernels, dtype, head, rotary, q_heads, kv_heads):
    """A prompt of 333 (rows vectorised: 16 lanes, or 8 where the rotary half is 40), a
    late chunk of 70 after a prefix, and a decode, each at its own scale."""
    b = _batch([333, 900, 601], [333, 70, 1], q_heads=q_heads, kv_heads=kv_heads, head=head,
               rotary=rotary, block=48, dtype=dtype)
    ref = _reference(b)
    tol = FP32 if dtype == torch.float32 else BF16
    for isa, lib in kernels.items():
        for seq in range(3):
            q0, q1 = int(b["query_start_loc"][seq]), int(b["query_start_loc"][seq + 1])
            torch.testing.assert_close(attend(lib, b, seq), ref[q0:q1].float(), **tol,
                                       msg=lambda m: f"{isa}, sequence {seq}: {m}")
