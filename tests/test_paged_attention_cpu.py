"""The CPU paged-attention kernel's vectorised loop (csrc/paged_attention_cpu_simd.h)
against the float64 reference, over the shapes that pick its variants: vector width
(16 lanes on AVX-512, 8 where the rotary half is not a multiple of 16), head sizes with
and without a compiled register count, row counts (GQA group x query tokens) around its
register blocking, spans of 128 keys and angle tiles of 32 crossing blocks of any size,
and the key splits the launcher merges. Also the builder's angle tables kept across steps.
"""

from __future__ import annotations

import pytest
import torch

from conftest import TOL
from test_dynamic_attention import HALF_TOL, _batch, _reference, _run_kernel, dynamic_policy
from yarn_vllm.attention.angles import AngleTables, angle_table
from yarn_vllm.ops import HAS_EXTENSION

needs_kernel = pytest.mark.skipif(not HAS_EXTENSION, reason="yarn_vllm._C not built")
FP32 = dict(rtol=1e-4, atol=2e-5)  # as test_dynamic_attention's kernel tests


@needs_kernel
@pytest.mark.parametrize("head,rotary", [(32, 32), (64, 64), (128, 128), (256, 256),
                                         (64, 32), (64, 16), (80, 80), (48, 48)], ids=str)
def test_head_sizes_and_rotary_dims(head, rotary):
    """16 lanes with 2, 4, 8, 16 vectors a row and a rotary tail; 8 lanes (rotary half 8,
    40, 24); head sizes with no compiled vector count (80, 48)."""
    b = _batch([300, 1000, 77], [1, 3, 77], head=head, rotary=rotary, q_heads=4, kv_heads=2)
    torch.testing.assert_close(_run_kernel(b), _reference(b), **FP32)


@needs_kernel
@pytest.mark.parametrize("q_heads,kv_heads,q_len", [(1, 1, 1), (2, 1, 1), (3, 1, 1), (5, 1, 1),
                                                    (9, 3, 1), (8, 1, 1), (8, 1, 3),
                                                    (9, 3, 21), (4, 2, 64)], ids=str)
def test_rows_around_the_register_blocking(q_heads, kv_heads, q_len):
    """Rows = group x q_len from 1 to 64: every count of rows held in registers at once,
    and extends whose rows see different causal prefixes within one span."""
    b = _batch([700, q_len + 200], [1, q_len], q_heads=q_heads, kv_heads=kv_heads)
    torch.testing.assert_close(_run_kernel(b), _reference(b), **FP32)


@needs_kernel
@pytest.mark.parametrize("block", [16, 48, 128, 160], ids=str)
@pytest.mark.parametrize("with_table", [True, False])
def test_block_sizes_and_context_edges(block, with_table):
    """Angle tiles and spans crossing block ends; lengths 1, 31, 33, 128, 129 and past a
    key split (2048), where partial results are merged."""
    b = _batch([1, 31, 33, 128, 129, 2100, 4097], [1] * 7, block=block)
    ref = _reference(b) if with_table else paged_attention_reference_fp32(b)
    torch.testing.assert_close(_run_kernel(b, with_table), ref, **FP32)


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("head", [64, 80])
def test_half_precision_caches(dtype, head):
    b = _batch([1500, 300], [1, 9], dtype=dtype, head=head, rotary=head)
    torch.testing.assert_close(_run_kernel(b).float(), _reference(b), **HALF_TOL[dtype])


# name: seq_lens, q_lens, (H_q, H_kv), head, rotary, block: prompts and chunks whose query
# tiles run vectorised over rows (csrc/paged_prefill_cpu_simd.h)
PREFILL = {
    "gqa3_16_lanes_chunk": ([777, 301], [777, 150], (9, 3), 64, 64, 16),
    "half40_8_lanes": ([333, 250], [333, 61], (4, 2), 80, 80, 48),
    "partial_rotary_odd_block": ([517, 95], [517, 95], (2, 2), 128, 32, 24),
    "group80_a_token_a_tile": ([150], [150], (80, 1), 64, 64, 32),
}


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("name", list(PREFILL))
def test_prefill_tiles_at_each_sequences_scale(name, dtype):
    """Query tiles of a prompt and of a late chunk against the reference, each sequence at
    its own scale; the contrast, every sequence one scale step off (its length plus the
    trained length), lands far away."""
    seq_lens, q_lens, (hq, hkv), head, rotary, block = PREFILL[name]
    b = _batch(seq_lens, q_lens, q_heads=hq, kv_heads=hkv, head=head, rotary=rotary,
               block=block, dtype=dtype)
    out, ref = _run_kernel(b).float(), _reference(b)
    torch.testing.assert_close(out, ref, **(FP32 if dtype == torch.float32 else HALF_TOL[dtype]))
    inv_freq, mult = dynamic_policy(rotary_dim=rotary).per_sequence([n + 256 for n in seq_lens])
    far = _reference({**b, "inv_freq": inv_freq, "logit_scale": mult * head ** -0.5})
    # 100x fp32's tolerance away, and 10x farther than the kernel is from the reference
    assert (out - far).abs().max() > max(100 * FP32["atol"], 10 * (out - ref).abs().max())


def paged_attention_reference_fp32(b):
    """Without a table the kernel forms angles in fp32, as the fp32 reference does."""
    from yarn_vllm.attention.reference import paged_attention_reference

    return paged_attention_reference(b["query"], b["key_cache"], b["value_cache"],
                                     b["block_table"], b["seq_lens"], b["query_start_loc"],
                                     b["inv_freq"], b["logit_scale"], True, torch.float32)


def test_angle_tables_across_steps_equal_a_fresh_table():
    """Decode steps at one scale reuse and extend the rows; a batch mixing scales, and a
    new scale every step (past L), get exactly what angle_table builds for that step."""
    policy = dynamic_policy(original=256)
    tables = AngleTables()
    steps = [[100], [101], [300], [301, 40], [900, 41, 2000], [901, 42, 2001], [], [5]]
    for lens in steps:
        inv, _ = policy.per_sequence(lens)
        table, start = tables(lens, inv)
        fresh, fresh_start = angle_table(lens, inv)
        for b, n in enumerate(lens):
            rows = 32 + (n + 31) // 32
            got = table[int(start[b]):int(start[b]) + rows]
            assert torch.equal(got, fresh[int(fresh_start[b]):int(fresh_start[b]) + rows])
        if lens:  # rows of scales this step did not use are dropped
            assert len(tables._rows) == len({inv[b].numpy().tobytes() for b in range(len(lens))})
