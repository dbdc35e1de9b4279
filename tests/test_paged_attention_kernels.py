"""Pre-RoPE paged attention kernels (Triton, CUDA) against the fp32 reference.

The Triton kernel runs on CPU tensors under TRITON_INTERPRET=1 in a subprocess:
the variable must be set before triton is first imported, and vLLM imports
triton in this process. CPU tensors cannot run through a compiled Triton
kernel, and the worker records that its kernel is the interpreter's, so a
silently compiled (or skipped) run fails here rather than passing.
"""

from __future__ import annotations

import math
import os
import shutil
import subprocess
import sys

import pytest
import torch

from conftest import TOL
from yarn_vllm.attention.reference import paged_attention_reference
from yarn_vllm.attention.rope_spec import DynamicRope
from yarn_vllm.attention.triton_paged import paged_attention_triton

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ORIGINAL = 16  # trained length: the test lengths span scales s = 1 .. 4

# Triton rounds the rotated q and k (and p) to bf16/fp16 for the tensor-core
# dots, as a cache of pre-rotated keys would hold them: each operand carries
# half an ulp, so logits of size ~sqrt(D) move by ~sqrt(D) * 2^-9 (bf16) and the
# output by about that times |v|, on top of TOL's rounding of the result.
ATTN_TOL = {torch.float32: TOL[torch.float32],
            torch.float16: {"rtol": 2.0 ** -9, "atol": 6e-3},
            torch.bfloat16: {"rtol": 2.0 ** -6, "atol": 5e-2}}

# name: seq_lens, q_lens, (H_q, H_kv), head_size, rotary_dim, block_size, dtype, extras
CASES = {
    "prefill": ([19, 33], [19, 33], (2, 2), 32, 32, 8, torch.float32, {}),
    "chunked_prefill": ([40, 27], [9, 27], (4, 2), 32, 32, 8, torch.float32, {}),
    "decode_gqa3": ([1, 17, 50, 64], [1, 1, 1, 1], (9, 3), 64, 64, 16, torch.float32, {}),
    "mixed": ([45, 6, 23, 30, 12], [1, 6, 10, 1, 0], (6, 2), 32, 32, 8, torch.float32, {}),
    "partial_rotary": ([21, 30], [21, 1], (4, 2), 64, 32, 8, torch.float32, {}),
    "odd_sizes": ([18, 26], [7, 1], (8, 2), 80, 20, 5, torch.float32, {}),
    "gptj_mqa": ([25, 14], [5, 1], (4, 1), 32, 32, 8, torch.float32, {"is_neox": False}),
    "gptj_partial": ([12, 40], [12, 1], (4, 2), 64, 48, 8, torch.float32, {"is_neox": False}),
    "strided_prefill": ([29, 9], [4, 9], (4, 2), 32, 32, 8, torch.float32, {"strided": True}),
    "mixed_bf16": ([45, 6, 23, 30], [1, 6, 10, 1], (4, 2), 32, 32, 8, torch.bfloat16, {}),
    "mixed_fp16": ([45, 6, 23, 30], [1, 6, 10, 1], (4, 2), 32, 32, 8, torch.float16, {}),
}


def make_case(name: str, device: str = "cpu", spec=None) -> dict:
    """Inputs of one case: shuffled block tables (with junk past each sequence),
    caches and query filled at random, YaRN frequencies of each sequence's scale."""
    seq_lens, q_lens, (hq, hkv), head_size, rotary_dim, bs, dtype, extra = spec or CASES[name]
    gen = torch.Generator().manual_seed(sum(map(ord, name)))
    is_neox = extra.get("is_neox", True)
    rope = DynamicRope(head_size=head_size, rotary_dim=rotary_dim, base=10000.0,
                       original_max_position=ORIGINAL, is_neox=is_neox)
    inv_freq, mult = rope.per_sequence(seq_lens)
    blocks = [(n + bs - 1) // bs for n in seq_lens]
    num_blocks = sum(blocks) + 3
    perm = torch.randperm(num_blocks, generator=gen).int()
    # past its own blocks a row holds other sequences' blocks: reading them is a bug
    table = perm[torch.randint(0, num_blocks, (len(seq_lens), max(blocks) + 1), generator=gen)]
    used = 0
    for b, n in enumerate(blocks):
        table[b, :n] = perm[used:used + n]
        used += n
    if extra.get("strided"):
        # vLLM's flash layout (num_blocks, block_size, H_kv, D) seen as (.., H_kv, block_size, D)
        key_cache = torch.randn(num_blocks, bs, hkv, head_size, generator=gen).permute(0, 2, 1, 3)
        value_cache = torch.randn(num_blocks, bs, hkv, head_size, generator=gen).permute(0, 2, 1, 3)
    else:
        key_cache = torch.randn(num_blocks, hkv, bs, head_size, generator=gen)
        value_cache = torch.randn(num_blocks, hkv, bs, head_size, generator=gen)
    tokens = sum(q_lens)
    if extra.get("strided"):
        fused = torch.randn(tokens, (hq + 2 * hkv) * head_size, generator=gen)
        query = fused[:, :hq * head_size].view(tokens, hq, head_size)
    else:
        query = torch.randn(tokens, hq, head_size, generator=gen)
    case = {
        "query": query.to(device, dtype), "key_cache": key_cache.to(device, dtype),
        "value_cache": value_cache.to(device, dtype), "block_table": table.to(device),
        "seq_lens": torch.tensor(seq_lens, dtype=torch.int32, device=device),
        "query_start_loc": torch.tensor([0] + q_lens, dtype=torch.int32).cumsum(0).int().to(device),
        "inv_freq": inv_freq.to(device),
        "logit_scale": (mult / math.sqrt(head_size)).to(device), "is_neox": is_neox}
    if extra.get("strided"):
        assert not case["key_cache"].is_contiguous() and not case["query"].is_contiguous()
    return case


def new_out(case: dict, strided: bool = False) -> torch.Tensor:
    q = case["query"]
    if strided:  # a view with padded rows: the kernel must honour out's strides
        return torch.full((q.shape[0], q.shape[1], q.shape[2] + 8), float("nan"),
                          dtype=q.dtype, device=q.device)[..., :q.shape[2]]
    return torch.full_like(q, float("nan"))


def reference(case: dict) -> torch.Tensor:
    return paged_attention_reference(**{k: v.cpu() if torch.is_tensor(v) else v
                                        for k, v in case.items()})


def run_triton(case: dict, strided_out: bool = False, **kw) -> torch.Tensor:
    out = new_out(case, strided_out)
    paged_attention_triton(out, case["query"], case["key_cache"], case["value_cache"],
                           case["block_table"], case["seq_lens"], case["query_start_loc"],
                           case["inv_freq"], case["logit_scale"], case["is_neox"], **kw)
    return out


def interpret_worker(path: str) -> None:
    """Runs every case through Triton's interpreter and saves the outputs to `path`."""
    assert os.environ.get("TRITON_INTERPRET") == "1"
    from yarn_vllm.attention import _triton_paged_kernel as k

    results = {"kernel_type": type(k.paged_attention_kernel).__name__}
    for name, spec in CASES.items():
        case = make_case(name)
        # small tiles: several query tiles and key blocks per sequence
        results[name] = run_triton(case, strided_out=spec[7].get("strided", False),
                                   block_m=16, block_n=32).float()
    torch.save(results, path)


# ------------------------------------------------------------------ CPU suite

def _start(args, **kw):
    return subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            **kw)


@pytest.fixture(scope="module")
def background(tmp_path_factory):
    """The slow checks, started together so that they overlap: the interpreter
    run and the nvcc compile."""
    tmp = tmp_path_factory.mktemp("paged")
    env = dict(os.environ, TRITON_INTERPRET="1")
    jobs = {"interpret": (_start([sys.executable, os.path.abspath(__file__), "--interpret",
                                  str(tmp / "triton.pt")], env=env, cwd=REPO),
                          tmp / "triton.pt")}
    if shutil.which("nvcc"):
        src = os.path.join(REPO, "csrc", "paged_attention_cuda_kernel.cu")
        # unoptimised: the check is that it compiles, and -O3 would double the time
        jobs["nvcc"] = (_start(["nvcc", "-std=c++17", "-c", "-Xcicc", "-O0", "-Xptxas", "-O0",
                                src, "-o", str(tmp / "k.o")]), tmp / "k.o")
    yield jobs
    for proc, _ in jobs.values():
        if proc.poll() is None:
            proc.kill()


def _finish(background, name: str, timeout: float = 300):
    proc, path = background[name]
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, out
    return out, path


@pytest.fixture(scope="module")
def triton_outputs(background):
    _, path = _finish(background, "interpret")
    results = torch.load(path)
    assert results.pop("kernel_type") == "InterpretedFunction"
    return results


@pytest.mark.parametrize("name", list(CASES))
def test_triton_interpreted_matches_reference(name, triton_outputs):
    case = make_case(name)
    torch.testing.assert_close(triton_outputs[name], reference(case),
                               **ATTN_TOL[case["query"].dtype])


def test_cases_tell_per_sequence_rope_apart():
    """The batch would catch a kernel that used one sequence's frequencies or
    logit scale for all: their outputs differ from the reference far past tolerance."""
    case = make_case("mixed")
    ref = reference(case)
    longest = int(case["seq_lens"].argmax())
    for key in ("inv_freq", "logit_scale"):
        wrong = dict(case)
        wrong[key] = case[key][longest].expand_as(case[key]).contiguous()
        assert (reference(wrong) - ref).abs().max() > 100 * TOL[torch.float32]["atol"], key
    assert len(set(case["logit_scale"].tolist())) >= 3


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not on PATH")
def test_cuda_kernel_compiles_without_torch_headers(background):
    src = os.path.join(REPO, "csrc", "paged_attention_cuda_kernel.cu")
    includes = [line for line in open(src) if line.startswith("#include")]
    assert includes and not any(h in line for line in includes for h in ("torch", "ATen", "c10"))
    _, obj = _finish(background, "nvcc")
    assert obj.stat().st_size > 0


def test_launcher_module_imports_triton_lazily():
    """Only the kernel module imports triton at import time; the launcher defers it."""
    import ast

    import yarn_vllm.attention.triton_paged as launcher

    tree = ast.parse(open(launcher.__file__).read())
    top = [n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))]
    names = [a.name for n in top for a in n.names] + [n.module or "" for n in top
                                                       if isinstance(n, ast.ImportFrom)]
    assert names and not any("triton" in name.split(".")[0] or "_triton" in name
                             for name in names), names


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1", reason="needs the compiler")
@pytest.mark.parametrize("dtype,group,head_size,rotary_dim,is_neox", [
    ("bf16", 4, 128, 128, True), ("fp32", 2, 80, 20, False)])
def test_triton_kernel_compiles_for_sm90(dtype, group, head_size, rotary_dim, is_neox):
    """The interpreter skips Triton's GPU lowering (layouts, dot shapes, constexpr
    branches); compiling to an sm_90 cubin here needs no GPU, only ptxas from the wheel."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from yarn_vllm.attention._triton_paged_kernel import paged_attention_kernel as kernel

    half, tail = rotary_dim // 2, head_size - rotary_dim
    pow2 = lambda x: max(16, 1 << (max(x, 1) - 1).bit_length())  # noqa: E731
    constexprs = dict(GROUP=group, BLOCK_M=64, BLOCK_N=64, BLOCK_HALF=pow2(half),
                      BLOCK_TAIL=pow2(tail), BLOCK_D=pow2(head_size), HAS_TAIL=tail > 0,
                      IS_NEOX=is_neox, PRECISION="ieee" if dtype == "fp32" else "tf32",
                      EMULATE=False)
    signature = {}
    for name in kernel.arg_names:
        if name in constexprs:
            signature[name] = "constexpr"
        elif name in ("out_ptr", "q_ptr", "k_cache_ptr", "v_cache_ptr"):
            signature[name] = f"*{dtype}"
        elif name in ("block_table_ptr", "seq_lens_ptr", "q_start_ptr"):
            signature[name] = "*i32"
        else:
            signature[name] = "*fp32" if name.endswith("_ptr") else "i32"
    source = ASTSource(kernel, signature, constexprs={(kernel.arg_names.index(n),): v
                                                      for n, v in constexprs.items()})
    compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32))
    assert compiled.asm["cubin"]


@pytest.mark.parametrize("mutate,match", [
    (lambda c: c.update(block_table=c["block_table"].long()), "block_table: expected int32"),
    (lambda c: c.update(seq_lens=c["seq_lens"][:-1]), "seq_lens: expected shape"),
    (lambda c: c.update(inv_freq=c["inv_freq"].double()), "inv_freq"),
    (lambda c: c.update(logit_scale=c["logit_scale"][:1]), "logit_scale"),
    (lambda c: c.update(query=c["query"][:, :3]), "not a multiple"),
    (lambda c: c.update(value_cache=c["value_cache"].half()), "value_cache: dtype"),
    (lambda c: c.update(key_cache=c["key_cache"][..., :16]), "key_cache"),
])
def test_triton_launcher_names_the_bad_argument(mutate, match):
    """Checked before triton is imported, so this runs anywhere."""
    case = make_case("chunked_prefill")
    mutate(case)
    with pytest.raises(ValueError, match=match):
        run_triton(case)


# ------------------------------------------------------------------ GPU suite

def _cuda_op_available() -> bool:
    if not torch.cuda.is_available():
        return False
    from yarn_vllm import ops
    return ops.HAS_EXTENSION and torch._C._dispatch_has_kernel_for_dispatch_key(
        "yarn_vllm::paged_attention", "CUDA")


needs_cuda_op = pytest.mark.skipif(not _cuda_op_available(),
                                   reason="needs a GPU and the CUDA build of yarn_vllm._C")
needs_triton_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")

# The CUDA kernel keeps q and k in fp32 after rotating them, so only the output
# rounding (TOL) and fp32 summation over up to 33k keys (atol) separate it from the reference.
CUDA_TOL = {dtype: {"rtol": tol["rtol"], "atol": 5e-5} for dtype, tol in TOL.items()}

# decode-only batches, long enough to be split over CTAs and merged
DECODE_CASES = {
    "smollm_long": ([8193, 1, 300, 33000], [1] * 4, (9, 3), 64, 64, 16, torch.bfloat16, {}),
    "llama_long": ([33000, 4097], [1, 1], (32, 8), 128, 128, 16, torch.bfloat16, {}),
    "llama_fp32": ([5000, 17, 257], [1] * 3, (32, 8), 128, 128, 16, torch.float32, {}),
    "fp16_gptj_partial": ([3000, 70], [1, 1], (8, 2), 80, 20, 16, torch.float16,
                          {"is_neox": False}),
    "mqa_group16": ([1000, 2], [1, 1], (16, 1), 64, 64, 32, torch.bfloat16, {}),
    "strided_views": ([700, 5, 9], [1, 1, 1], (4, 2), 64, 64, 16, torch.float32,
                      {"strided": True}),
}


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


@pytest.mark.gpu
@needs_triton_gpu
@pytest.mark.parametrize("name", TRITON_GPU_CASES)
def test_triton_cuda_matches_reference(name):
    case = make_case(name, "cuda", {**CASES, **DECODE_CASES}[name])
    out = run_triton(case, strided_out=True)
    torch.testing.assert_close(out.float().cpu(), reference(case), **ATTN_TOL[case["query"].dtype])


@pytest.mark.gpu
@needs_cuda_op
@pytest.mark.parametrize("name", ["decode_gqa3"] + list(DECODE_CASES))
def test_cuda_decode_matches_reference(name):
    case = make_case(name, "cuda", {**CASES, **DECODE_CASES}[name])
    out = _cuda_op(case, new_out(case, strided=True))
    torch.testing.assert_close(out.float().cpu(), reference(case), **CUDA_TOL[case["query"].dtype])


def _prerotate(case: dict) -> dict:
    """The case with q and the cached keys rotated ahead: what rotate=False reads."""
    from yarn_vllm.ops import rotary_reference

    rotated = dict(case)
    key_cache = case["key_cache"].float().clone()
    bs = key_cache.shape[2]
    for b, n in enumerate(case["seq_lens"].tolist()):
        for t in range(n):
            blk = int(case["block_table"][b, t // bs])
            row = key_cache[blk, :, t % bs][None]
            key_cache[blk, :, t % bs] = rotary_reference(
                row, torch.tensor([t], device=row.device), case["inv_freq"][b], 1.0,
                case["is_neox"])[0]
    rotated["key_cache"] = key_cache.to(case["key_cache"].dtype)
    q = case["query"].float().clone()
    for b, n in enumerate(case["seq_lens"].tolist()):
        tok = int(case["query_start_loc"][b])
        q[tok:tok + 1] = rotary_reference(q[tok:tok + 1], torch.tensor([n - 1], device=q.device),
                                          case["inv_freq"][b], 1.0, case["is_neox"])
    rotated["query"] = q.to(case["query"].dtype)
    return rotated


@pytest.mark.gpu
@needs_cuda_op
def test_cuda_prerotated_variant_is_the_same_attention():
    """rotate=False on keys rotated ahead gives rotate=True's result (fp32 keys, so
    rotating ahead loses nothing)."""
    case = make_case("decode_gqa3", "cuda")
    on_load = _cuda_op(case, new_out(case))
    ahead = _cuda_op(_prerotate(case), new_out(case), rotate=False)
    torch.testing.assert_close(ahead, on_load, **CUDA_TOL[torch.float32])


@pytest.mark.gpu
@needs_cuda_op
def test_cuda_op_refuses_prefill():
    case = make_case("chunked_prefill", "cuda")
    with pytest.raises(RuntimeError, match="decode batches only"):
        _cuda_op(case, new_out(case))


@pytest.mark.gpu
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


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--interpret":
        interpret_worker(sys.argv[2])
    else:
        sys.exit("usage: TRITON_INTERPRET=1 python tests/test_paged_attention_kernels.py "
                 "--interpret OUT.pt")
