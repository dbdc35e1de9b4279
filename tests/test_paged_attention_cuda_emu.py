"""The CUDA decode kernel's own source, run on the CPU (tests/cuda_emu), against the reference.

No GPU is needed: the .cu file is compiled by g++ against a small CUDA shim (one
OS thread per CUDA thread, __shared__ as CTA-wide statics, warp shuffles through
a per-warp buffer), behind the launcher's own argument checks and marshalling.
This checks indexing, GQA head tiles, partial rotary, strides, context splits
and their merge, and the synchronisation; not speed, and not CUDA's own
sincosf/exp2f ulps. Small cases run in the default tier (seconds each); the
larger ones are `slow`.
"""

from __future__ import annotations

import shutil

import pytest
import torch

from cuda_emu.emu import Emulator, build
from paged_cases import CUDA_TOL, make_case, new_out, reference

# decode batches; 300 keys make two 256-key chunks, so up to two splits
SMALL = {
    "gqa2_split": ([300, 5], [1, 1], (4, 2), 32, 32, 16, torch.float32, {}),
    "bf16_gptj_partial": ([290, 3], [1, 1], (4, 2), 48, 32, 16, torch.bfloat16,
                          {"is_neox": False}),
}
LARGE = {
    "gqa3_split": ([1, 17, 50, 600], [1] * 4, (9, 3), 64, 64, 16, torch.float32, {}),
    "strided": ([300, 5], [1, 1], (4, 2), 64, 64, 16, torch.float32, {"strided": True}),
    "gptj_partial_d80": ([300, 70], [1, 1], (8, 2), 80, 20, 16, torch.float32,
                         {"is_neox": False}),
    "group12_two_tiles": ([290, 3], [1, 1], (12, 1), 32, 32, 16, torch.float32, {}),
    "bf16_d128": ([530, 40], [1, 1], (8, 2), 128, 128, 16, torch.bfloat16, {}),
    "fp16_gptj": ([260, 40], [1, 1], (4, 2), 64, 48, 8, torch.float16, {"is_neox": False}),
}
CASES = {**SMALL, **LARGE}


@pytest.fixture(scope="module")
def emu_lib():
    if shutil.which("g++") is None:
        pytest.skip("g++ not on PATH")
    return build()


def _run(lib, case: dict, num_sms: int) -> tuple[torch.Tensor, int]:
    emulator = Emulator(lib, num_sms)
    out = new_out(case, strided=True)
    emulator(out, case["query"], case["key_cache"], case["value_cache"], case["block_table"],
             case["seq_lens"], case["query_start_loc"], case["inv_freq"], case["logit_scale"],
             None, None, case["is_neox"])
    return out, emulator.splits


@pytest.mark.parametrize("num_sms", [1000, 1], ids=["split", "whole"])
@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n in LARGE else n
                                  for n in CASES])
def test_emulated_cuda_decode_matches_reference(emu_lib, name, num_sms):
    case = make_case(name, "cpu", CASES[name])
    out, splits = _run(emu_lib, case, num_sms)
    assert (splits > 1) == (num_sms > 1)  # both paths really ran
    torch.testing.assert_close(out.float(), reference(case), **CUDA_TOL[case["query"].dtype])


def test_emulated_nan_key_propagates_as_in_the_reference(emu_lib):
    """A NaN key makes exactly the reference's rows NaN (every query that sees it)."""
    case = make_case("gqa2_split", "cpu", SMALL["gqa2_split"])
    block = int(case["block_table"][0, 3])  # key 50 of sequence 0, in the second split
    case["key_cache"][block, 1, 50 % 16, 7] = float("nan")
    out, _ = _run(emu_lib, case, 1000)
    expected = reference(case)
    assert expected.isnan().any()
    assert torch.equal(out.isnan(), expected.isnan())
    torch.testing.assert_close(out[~expected.isnan()], expected[~expected.isnan()],
                               **CUDA_TOL[torch.float32])
