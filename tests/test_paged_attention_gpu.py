"""Pre-RoPE paged attention kernels on a GPU (`gpu` marker): the CUDA decode op and
Triton against the fp32 reference, and against xformers where it is installed."""

from __future__ import annotations

import pytest
import torch

from paged_cases import (ATTN_TOL, CASES, CUDA_TOL, DECODE_CASES, make_case, new_out, prerotate,
                         reference, run_triton)

pytestmark = pytest.mark.gpu


def _cuda_op_available() -> bool:
    if not torch.cuda.is_available():
        return False
    from yarn_vllm import ops
    return ops.HAS_EXTENSION and torch._C._dispatch_has_kernel_for_dispatch_key(
        "yarn_vllm::paged_attention", "CUDA")


needs_cuda_op = pytest.mark.skipif(not _cuda_op_available(),
                                   reason="needs a GPU and the CUDA build of yarn_vllm._C")
needs_triton_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")


def _cuda_op(case, out, rotate=None):
    args = (out, case["query"], case["key_cache"], case["value_cache"], case["block_table"],
            case["seq_lens"], case["query_start_loc"], case["inv_freq"], case["logit_scale"])
    if rotate is None:
        torch.ops.yarn_vllm.paged_attention(*args, None, None, case["is_neox"])
    else:
        torch.ops.yarn_vllm.paged_attention_decode_cuda(*args, case["is_neox"], rotate)
    return out


# the interpreter covers every case's logic; on the GPU, one case per Triton
# specialisation worth compiling (each costs seconds) and the long contexts
TRITON_GPU_CASES = ["chunked_prefill", "mixed", "odd_sizes", "gptj_partial", "strided_prefill",
                    "mixed_bf16", "mixed_fp16", "smollm_long", "llama_long", "fp16_gptj_partial"]


@needs_triton_gpu
@pytest.mark.parametrize("name", TRITON_GPU_CASES)
def test_triton_cuda_matches_reference(name):
    case = make_case(name, "cuda", {**CASES, **DECODE_CASES}[name])
    out = run_triton(case, strided_out=True)
    torch.testing.assert_close(out.float().cpu(), reference(case), **ATTN_TOL[case["query"].dtype])


@needs_cuda_op
@pytest.mark.parametrize("name", ["decode_gqa3"] + list(DECODE_CASES))
def test_cuda_decode_matches_reference(name):
    case = make_case(name, "cuda", {**CASES, **DECODE_CASES}[name])
    out = _cuda_op(case, new_out(case, strided=True))
    torch.testing.assert_close(out.float().cpu(), reference(case), **CUDA_TOL[case["query"].dtype])




@needs_cuda_op
def test_cuda_prerotated_variant_is_the_same_attention():
    """rotate=False on keys rotated ahead gives rotate=True's result (fp32 keys, so
    rotating ahead loses nothing)."""
    case = make_case("decode_gqa3", "cuda")
    on_load = _cuda_op(case, new_out(case))
    ahead = _cuda_op(prerotate(case), new_out(case), rotate=False)
    torch.testing.assert_close(ahead, on_load, **CUDA_TOL[torch.float32])


@needs_cuda_op
def test_cuda_op_empty_batch():
    case = make_case("decode_gqa3", "cuda")
    empty = {k: (v[:0] if torch.is_tensor(v) and k not in ("key_cache", "value_cache") else v)
             for k, v in case.items()}
    empty["query_start_loc"] = case["query_start_loc"][:1]
    _cuda_op(empty, new_out(empty))  # launches nothing, and does not divide by zero


@needs_cuda_op
def test_cuda_op_refuses_prefill():
    case = make_case("chunked_prefill", "cuda")
    with pytest.raises(RuntimeError, match="decode batches only"):
        _cuda_op(case, new_out(case))


@needs_triton_gpu
@pytest.mark.parametrize("name", ["chunked_prefill", "mixed_bf16", "smollm_long"])
def test_against_xformers(name):
    """An independent kernel on the same maths: xformers on the gathered, rotated q/k."""
    xops = pytest.importorskip("xformers.ops")
    from xformers.ops.fmha.attn_bias import LowerTriangularFromBottomRightMask

    from yarn_vllm.attention.reference import gather_sequence
    from yarn_vllm.ops import rotary_reference

    case = make_case(name, "cuda", {**CASES, **DECODE_CASES}[name])
    dtype = case["query"].dtype
    expected = torch.zeros(case["query"].shape, dtype=torch.float32, device="cuda")
    group = case["query"].shape[1] // case["key_cache"].shape[1]
    for b, n in enumerate(case["seq_lens"].tolist()):
        start, end = case["query_start_loc"][b:b + 2].tolist()
        if end == start:
            continue
        pos = torch.arange(n, device="cuda")
        k = gather_sequence(case["key_cache"], case["block_table"][b], n)
        v = gather_sequence(case["value_cache"], case["block_table"][b], n)
        q = rotary_reference(case["query"][start:end], pos[n - (end - start):],
                             case["inv_freq"][b], 1.0, case["is_neox"])
        k = rotary_reference(k, pos, case["inv_freq"][b], 1.0, case["is_neox"])
        o = xops.memory_efficient_attention(
            q.to(dtype)[None], k.to(dtype).repeat_interleave(group, 1)[None],
            v.repeat_interleave(group, 1)[None], attn_bias=LowerTriangularFromBottomRightMask(),
            scale=float(case["logit_scale"][b]))
        expected[start:end] = o[0].float()
    torch.testing.assert_close(run_triton(case).float(), expected, **ATTN_TOL[dtype])
