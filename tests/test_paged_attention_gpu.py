"""Pre-RoPE paged attention kernels on a GPU (`gpu` marker): the CUDA decode op and
Triton against the fp32 reference, and against xformers where it is installed."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from paged_cases import (ATTN_TOL, CASES, CUDA_TOL, DECODE_CASES, make_case, new_out, reference,
                         run_triton)
from yarn_vllm import ops
from yarn_vllm.attention.paged import choose_kernel, paged_attention

pytestmark = pytest.mark.gpu
NAMES = ("query", "key_cache", "value_cache", "block_table", "seq_lens", "query_start_loc",
         "inv_freq", "logit_scale")

needs_cuda_op = pytest.mark.skipif(
    not torch.cuda.is_available() or not ops.has_kernel("paged_attention", "CUDA"),
    reason="needs a GPU and the CUDA build of yarn_vllm._C")
needs_triton_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")


def _cuda_op(case, out):
    torch.ops.yarn_vllm.paged_attention(out, *[case[k] for k in NAMES], None, None,
                                        case["is_neox"])
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
@pytest.mark.parametrize("name,route", [("decode_gqa3", "cuda"), ("mixed", "triton"),
                                        ("chunked_prefill", "triton")])
def test_one_entry_point_routes_and_matches_reference(name, route):
    """attention.paged.paged_attention: decode batches to the CUDA op, the rest to Triton."""
    case = make_case(name, "cuda")
    q_lens = case["query_start_loc"].diff()
    assert choose_kernel(case["query"], q_lens.shape[0], case["query_start_loc"],
                         int(q_lens.max())) == route
    out = new_out(case)
    paged_attention(out, *[case[k] for k in NAMES], case["is_neox"])
    tol = CUDA_TOL if route == "cuda" else ATTN_TOL
    torch.testing.assert_close(out.float().cpu(), reference(case), **tol[case["query"].dtype])


def test_debug_switch_checks_values_on_the_device():
    """YARN_VLLM_CHECK_ARGS=1: the CUDA op reads offsets, lengths and block ids back (a
    sync) and refuses bad ones, as the CPU op always does."""
    code = (
        f"import sys; sys.path.insert(0, {os.path.dirname(os.path.abspath(__file__))!r})\n"
        "import torch\n"
        "from paged_cases import make_case, new_out\n"
        "import yarn_vllm.ops\n"
        "names = ('query', 'key_cache', 'value_cache', 'block_table', 'seq_lens',\n"
        "         'query_start_loc', 'inv_freq', 'logit_scale')\n"
        "for key, index, value, match in [('block_table', (1, 0), 10 ** 6, 'uses block'),\n"
        "        ('logit_scale', 0, float('nan'), 'finite'),\n"
        "        ('query_start_loc', (2,), 3, 'decode batches only')]:\n"
        "    case = make_case('decode_gqa3', 'cuda')\n"
        "    case[key][index] = value\n"
        "    try:\n"
        "        torch.ops.yarn_vllm.paged_attention(new_out(case), *[case[k] for k in names],\n"
        "                                            None, None, True)\n"
        "    except RuntimeError as e:\n"
        "        assert match in str(e), e\n"
        "    else:\n"
        "        raise AssertionError(f'{key} accepted')\n"
        "print('checked')\n")
    if not torch.cuda.is_available() or not ops.has_kernel("paged_attention", "CUDA"):
        pytest.skip("needs a GPU and the CUDA build of yarn_vllm._C")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env=dict(os.environ, YARN_VLLM_CHECK_ARGS="1"))
    assert out.returncode == 0 and "checked" in out.stdout, out.stderr


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
