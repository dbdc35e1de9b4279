"""Shared cases of the paged attention kernel tests: inputs, reference, tolerances.

Also the Triton interpreter worker: `TRITON_INTERPRET=1 python tests/paged_cases.py
--interpret OUT.pt` runs every case through the interpreted Triton kernel. It is
a separate process because the variable must be set before triton is first
imported, and vLLM imports triton in the pytest process.
"""

from __future__ import annotations

import math
import os
import sys

import torch

from conftest import TOL
from yarn_vllm.yarn import yarn_math
from yarn_vllm.attention.reference import paged_attention_reference
from yarn_vllm.attention.triton_paged import paged_attention_triton

ORIGINAL = 16  # trained length: the test lengths span scales s = 1 .. 4

# Triton rounds the rotated q and k (and p) to bf16/fp16 for the tensor-core
# dots, as a cache of pre-rotated keys would hold them: each operand carries
# half an ulp, so logits of size ~sqrt(D) move by ~sqrt(D) * 2^-9 (bf16) and the
# output by about that times |v|, on top of TOL's rounding of the result.
ATTN_TOL = {torch.float32: TOL[torch.float32],
            torch.float16: {"rtol": 2.0 ** -9, "atol": 6e-3},
            torch.bfloat16: {"rtol": 2.0 ** -6, "atol": 5e-2}}

SPLIT_CASES = ["chunked_prefill", "mixed", "mixed_bf16"]

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


def per_sequence_rope(seq_lens, rotary_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each sequence's YaRN frequencies [B, rotary_dim / 2] and attention_scale [B] at
    s = max(1, len / ORIGINAL) (paper Eq. 24), straight from yarn_math."""
    scales = [max(1.0, n / ORIGINAL) for n in seq_lens]
    inv_freq = torch.stack([yarn_math.yarn_inv_freq(rotary_dim, 10000.0, s, ORIGINAL)
                            for s in scales])
    attention_scale = torch.tensor([yarn_math.attention_scale(yarn_math.yarn_mscale(s))
                                    for s in scales], dtype=torch.float32)
    return inv_freq, attention_scale


def make_case(name: str, device: str = "cpu", spec=None) -> dict:
    """Inputs of one case: shuffled block tables (with junk past each sequence),
    caches and query filled at random, YaRN frequencies of each sequence's scale."""
    seq_lens, q_lens, (hq, hkv), head_size, rotary_dim, bs, dtype, extra = spec or CASES[name]
    gen = torch.Generator().manual_seed(sum(map(ord, name)))
    is_neox = extra.get("is_neox", True)
    inv_freq, mult = per_sequence_rope(seq_lens, rotary_dim)
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
    if 0 in q.stride():  # an expanded probe (tests refuse it): out expanded alike, no memory
        return torch.full(q.shape[2:], float("nan"), dtype=q.dtype, device=q.device).expand(q.shape)
    if strided:  # a view with padded rows: the kernel must honour out's strides
        return torch.full((q.shape[0], q.shape[1], q.shape[2] + 8), float("nan"),
                          dtype=q.dtype, device=q.device)[..., :q.shape[2]]
    return torch.full_like(q, float("nan"))


def reference(case: dict) -> torch.Tensor:
    """The fp32 reference of a case (its optional angle table is a CPU accelerator only)."""
    return paged_attention_reference(**{k: v.cpu() if torch.is_tensor(v) else v
                                        for k, v in case.items()
                                        if k not in ("cos_sin", "cos_sin_start")})


def run_triton(case: dict, strided_out: bool = False, **kw) -> torch.Tensor:
    out = new_out(case, strided_out)
    paged_attention_triton(out, case["query"], case["key_cache"], case["value_cache"],
                           case["block_table"], case["seq_lens"], case["query_start_loc"],
                           case["inv_freq"], case["logit_scale"], case["is_neox"], **kw)
    return out


def nan_key_case() -> dict:
    """The "mixed" case with one NaN key (sequence 0, key 3, kv head 1)."""
    case = make_case("mixed")
    case["key_cache"][int(case["block_table"][0, 0]), 1, 3, 5] = float("nan")
    return case


def interpret_worker(path: str) -> None:
    """Runs every case through Triton's interpreter and saves the outputs to `path`."""
    assert os.environ.get("TRITON_INTERPRET") == "1"
    from yarn_vllm.attention import _triton_paged_kernel as k
    from yarn_vllm.attention.paged import paged_attention

    results = {"kernel_type": type(k.paged_attention_kernel).__name__}
    for name, spec in CASES.items():
        case = make_case(name)
        # small tiles: several query tiles and key blocks per sequence
        results[name] = run_triton(case, strided_out=spec[7].get("strided", False),
                                   block_m=16, block_n=32).float()
    for name in SPLIT_CASES:  # contexts split over programs, then merged
        results[name + "/split"] = run_triton(make_case(name), block_m=16, block_n=16,
                                              num_splits=3).float()
    results["nan_key"] = run_triton(nan_key_case()).float()
    # the one entry point, told to take the GPU's route on these CPU tensors
    case = make_case("mixed")
    out = new_out(case)
    paged_attention(out, *[case[k] for k in ("query", "key_cache", "value_cache", "block_table",
                                             "seq_lens", "query_start_loc", "inv_freq",
                                             "logit_scale", "is_neox")], kernel="triton")
    results["mixed/routed"] = out.float()
    torch.save(results, path)


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


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--interpret":
        interpret_worker(sys.argv[2])
    else:
        sys.exit("usage: TRITON_INTERPRET=1 python tests/paged_cases.py --interpret OUT.pt")
