"""Pre-RoPE paged attention kernels without a GPU: Triton (interpreted) and CUDA (compiled).

The Triton kernel runs on CPU tensors under TRITON_INTERPRET=1 in a subprocess
(tests/paged_cases.py). CPU tensors cannot run through a compiled Triton
kernel, and the worker records that its kernel is the interpreter's, so a
silently compiled (or skipped) run fails here rather than passing. The GPU
checks are in test_paged_attention_gpu.py.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest
import torch

from conftest import TOL
from paged_cases import (ATTN_TOL, CASES, SPLIT_CASES, make_case, nan_key_case, new_out,
                         reference)
from yarn_vllm import ops
from yarn_vllm.attention.paged import choose_kernel, paged_attention

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _start(args, **kw):
    return subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            **kw)


@pytest.fixture(scope="module")
def background(tmp_path_factory):
    """The slow checks, started together so that they overlap: the interpreter
    run and the nvcc compile."""
    tmp = tmp_path_factory.mktemp("paged")
    env = dict(os.environ, TRITON_INTERPRET="1")
    worker = os.path.join(REPO, "tests", "paged_cases.py")
    jobs = {"interpret": (_start([sys.executable, worker, "--interpret", str(tmp / "triton.pt")],
                                 env=env, cwd=REPO),
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


@pytest.mark.parametrize("name", list(CASES) + [n + "/split" for n in SPLIT_CASES]
                         + ["mixed/routed"])
def test_triton_interpreted_matches_reference(name, triton_outputs):
    """Every case; "/split" with contexts split and merged; "/routed" through
    attention.paged.paged_attention(kernel="triton"), the GPU's route."""
    case = make_case(name.split("/")[0])
    torch.testing.assert_close(triton_outputs[name], reference(case),
                               **ATTN_TOL[case["query"].dtype])


def test_triton_interpreted_nan_key_propagates_as_in_the_reference(triton_outputs):
    out, expected = triton_outputs["nan_key"], reference(nan_key_case())
    assert expected.isnan().any() and torch.equal(out.isnan(), expected.isnan())


@pytest.mark.skipif(not ops.HAS_EXTENSION, reason="yarn_vllm._C not built")
def test_one_entry_point_picks_the_cpu_op_on_cpu():
    case = make_case("mixed")
    names = ("query", "key_cache", "value_cache", "block_table", "seq_lens", "query_start_loc",
             "inv_freq", "logit_scale", "is_neox")
    assert choose_kernel(case["query"], 5, case["query_start_loc"], None) == "cpu"
    out = new_out(case)
    paged_attention(out, *[case[k] for k in names])
    torch.testing.assert_close(out, reference(case), **TOL[torch.float32])
    with pytest.raises(ValueError, match="kernel 'flash' is not one of"):
        paged_attention(out, *[case[k] for k in names], kernel="flash")
    if os.environ.get("TRITON_INTERPRET") != "1":
        with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
            paged_attention(out, *[case[k] for k in names], kernel="triton")
    with pytest.raises(RuntimeError, match="no implementation for meta tensors"):
        choose_kernel(case["query"].to("meta"), 5, case["query_start_loc"], None)


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


def _compile_sm90(kernel, constexprs: dict, dtype: str):
    """An sm_90 cubin of `kernel`; tensors of `dtype` except int32 tables and fp32 extras."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

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
    return triton.compile(source, target=GPUTarget("cuda", 90, 32)).asm["cubin"]


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1", reason="needs the compiler")
@pytest.mark.parametrize("dtype,group,head_size,rotary_dim,is_neox,split", [
    ("bf16", 4, 128, 128, True, True), ("fp32", 2, 80, 20, False, False)])
def test_triton_kernels_compile_for_sm90(dtype, group, head_size, rotary_dim, is_neox, split):
    """The interpreter skips Triton's GPU lowering (layouts, dot shapes, constexpr
    branches); compiling to an sm_90 cubin here needs no GPU, only ptxas from the wheel."""
    from yarn_vllm.attention import _triton_paged_kernel as k

    half, tail = rotary_dim // 2, head_size - rotary_dim
    pow2 = lambda x: max(16, 1 << (max(x, 1) - 1).bit_length())  # noqa: E731
    assert _compile_sm90(k.paged_attention_kernel, dict(
        GROUP=group, BLOCK_M=64, BLOCK_N=64, BLOCK_HALF=pow2(half), BLOCK_TAIL=pow2(tail),
        BLOCK_D=pow2(head_size), HAS_TAIL=tail > 0, IS_NEOX=is_neox,
        PRECISION="ieee" if dtype == "fp32" else "tf32", EMULATE=False, SPLIT=split), dtype)
    if split:
        assert _compile_sm90(k.merge_splits_kernel, dict(
            GROUP=group, BLOCK_M=64, BLOCK_D=pow2(head_size)), dtype)
