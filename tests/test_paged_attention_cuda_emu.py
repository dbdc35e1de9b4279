"""The CUDA decode kernel's own source, run on the CPU (tests/cuda_emu), against the reference.

No GPU is needed: the .cu file is compiled by g++ against a small CUDA shim (one
OS thread per CUDA thread, __shared__ as CTA-wide statics, warp shuffles through
a per-warp buffer). This checks indexing, GQA head tiles, partial rotary,
strides, context splits and their merge, and the synchronisation; not speed,
and not CUDA's own sincosf/exp2f ulps. `slow`: one build plus a few thousand
threads per case, minutes on a small machine.
"""

from __future__ import annotations

import ctypes
import os
import re
import shutil
import subprocess

import pytest
import torch

from paged_cases import CUDA_TOL, make_case, new_out, prerotate, reference

pytestmark = pytest.mark.slow

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DTYPES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}  # yarn::DType

# decode batches; 600 keys make three 256-key chunks, so up to three splits
CASES = {
    "gqa3_split": ([1, 17, 50, 600], [1] * 4, (9, 3), 64, 64, 16, torch.float32, {}),
    "strided": ([300, 5], [1, 1], (4, 2), 64, 64, 16, torch.float32, {"strided": True}),
    "gptj_partial_d80": ([300, 70], [1, 1], (8, 2), 80, 20, 16, torch.float32,
                         {"is_neox": False}),
    "group12_two_tiles": ([290, 3], [1, 1], (12, 1), 32, 32, 16, torch.float32, {}),
    "bf16_d128": ([530, 40], [1, 1], (8, 2), 128, 128, 16, torch.bfloat16, {}),
    "fp16_gptj": ([260, 40], [1, 1], (4, 2), 64, 48, 8, torch.float16, {"is_neox": False}),
}


@pytest.fixture(scope="module")
def emu(tmp_path_factory):
    if shutil.which("g++") is None:
        pytest.skip("g++ not on PATH")
    tmp = tmp_path_factory.mktemp("cuda_emu")
    src = open(os.path.join(REPO, "csrc", "paged_attention_cuda_kernel.cu")).read()
    src = re.sub(r"#include <cuda[^>]*>\n", "", src)
    src = src.replace('#include "paged_attention_cuda.h"',
                      '#include "emu_shim.h"\n#include "paged_attention_cuda.h"')
    src = re.sub(r"([\w:]+(?:<[^<>]*>)?)<<<(.*?),\s*(\w+),\s*0,\s*stream>>>\((.*?)\);",
                 r"emu_launch(\2, dim3(\3), [&] { \1(\4); });", src)
    assert "<<<" not in src, "a kernel launch the rewrite does not know"
    (tmp / "kernel_emu.cpp").write_text(src)
    lib = tmp / "libemu.so"
    out = subprocess.run(
        ["g++", "-std=c++20", "-O1", "-pthread", "-shared", "-fPIC",
         "-I", os.path.join(REPO, "csrc"), "-I", os.path.join(REPO, "tests", "cuda_emu"),
         "-I", str(tmp), os.path.join(REPO, "tests", "cuda_emu", "emu_harness.cpp"),
         "-o", str(lib)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    return ctypes.CDLL(str(lib))


def run_emulated(lib, case: dict, out: torch.Tensor, rotate: bool, num_sms: int) -> int:
    """Calls the kernel through emu_harness.cpp; returns the splits it launched."""
    q, kc, vc = case["query"], case["key_cache"], case["value_cache"]
    sizes = [case["block_table"].shape[0], q.shape[1], kc.shape[1], q.shape[2],
             2 * case["inv_freq"].shape[1], kc.shape[2]]
    strides = [*q.stride(), *out.stride(), *kc.stride(), *vc.stride(),
               case["block_table"].stride(0), case["inv_freq"].stride(0)]

    def ptr(t):
        return ctypes.c_void_p(t.data_ptr())

    splits = lib.emu_paged_decode(
        DTYPES[q.dtype], ptr(out), ptr(q), ptr(kc), ptr(vc), ptr(case["block_table"]),
        ptr(case["seq_lens"]), ptr(case["query_start_loc"]), ptr(case["inv_freq"]),
        ptr(case["logit_scale"]), (ctypes.c_int64 * 6)(*sizes), (ctypes.c_int64 * 16)(*strides),
        int(case["is_neox"]), int(rotate),
        ctypes.c_int64(case["block_table"].shape[1] * kc.shape[2]), num_sms)
    assert splits > 0, f"kernel refused the arguments ({splits})"
    return splits


@pytest.mark.parametrize("num_sms", [1000, 1], ids=["split", "whole"])
@pytest.mark.parametrize("name", list(CASES))
def test_emulated_cuda_decode_matches_reference(emu, name, num_sms):
    case = make_case(name, "cpu", CASES[name])
    out = new_out(case, strided=True)
    splits = run_emulated(emu, case, out, rotate=True, num_sms=num_sms)
    assert (splits > 1) == (num_sms > 1)  # both paths really ran
    torch.testing.assert_close(out.float(), reference(case), **CUDA_TOL[case["query"].dtype])


def test_emulated_prerotated_variant(emu):
    """ROTATE=false on keys rotated ahead is the same attention as ROTATE=true."""
    case = make_case("gqa3_split", "cpu", CASES["gqa3_split"])
    on_load, ahead = new_out(case), new_out(case)
    run_emulated(emu, case, on_load, rotate=True, num_sms=1000)
    run_emulated(emu, prerotate(case), ahead, rotate=False, num_sms=1000)
    torch.testing.assert_close(ahead, on_load, **CUDA_TOL[torch.float32])
