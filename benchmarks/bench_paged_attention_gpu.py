"""Pre-RoPE paged attention on the GPU: what rotating keys on load costs.

Decode (one query token per sequence), one sequence and a batch, at 4k, 16k
and 32k context, for SmolLM2-like (9 q heads, 3 kv heads, d=64) and
Llama-8B-like (32/8, d=128) shapes, bf16 cache, block_size 16. Providers:
  cuda     our CUDA decode op, keys rotated as they are loaded (Dynamic YaRN)
  triton   the Triton kernel (rotates on load), on the same batch
  copy     a device copy of the same K and V bytes: the bandwidth roofline. Decode
           reads every cached key and value once, so cuda's share of copy's
           bandwidth says what rotating on load leaves on the table (1.0: nothing)
Prefill (one sequence, all its tokens queried): the Triton kernel against
torch's SDPA (flash) on contiguous, pre-rotated q/k/v as a speed-of-light.

Prints ms (median [p20, p80]) and decode bandwidth; writes JSON.

  python benchmarks/bench_paged_attention_gpu.py [--quick] [--out FILE]
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from timing import environment, measure, write_json  # noqa: E402

from yarn_vllm import ops, yarn_math  # noqa: E402
from yarn_vllm.attention.triton_paged import paged_attention_triton  # noqa: E402

SHAPES = {"smollm2": (9, 3, 64), "llama8b": (32, 8, 128)}
ORIGINAL = 8192  # trained length: 16k and 32k contexts run at s = 2 and 4
BLOCK_SIZE = 16
DTYPE = torch.bfloat16


def per_sequence_rope(context: int, num_seqs: int, head_dim: int):
    """Dynamic YaRN at s = max(1, context / ORIGINAL): inv_freq [B, d/2], attention_scale [B]."""
    s = max(1.0, context / ORIGINAL)
    inv = yarn_math.yarn_inv_freq(head_dim, 5e5, s, ORIGINAL).expand(num_seqs, -1).contiguous()
    mult = torch.full((num_seqs,), yarn_math.attention_scale(yarn_math.yarn_mscale(s)))
    return inv, mult


def make_batch(shape: str, context: int, q_len: int, num_seqs: int) -> dict:
    """num_seqs sequences of `context` tokens, the last q_len of each queried."""
    hq, hkv, d = SHAPES[shape]
    gen = torch.Generator(device="cuda").manual_seed(0)
    blocks = -(-context // BLOCK_SIZE)
    num_blocks = num_seqs * blocks
    perm = torch.randperm(num_blocks, device="cuda", generator=gen).int()
    inv, mult = per_sequence_rope(context, num_seqs, d)
    return {
        "query": torch.randn(num_seqs * q_len, hq, d, device="cuda", dtype=DTYPE, generator=gen),
        "key_cache": torch.randn(num_blocks, hkv, BLOCK_SIZE, d, device="cuda", dtype=DTYPE,
                                 generator=gen),
        "value_cache": torch.randn(num_blocks, hkv, BLOCK_SIZE, d, device="cuda", dtype=DTYPE,
                                   generator=gen),
        "block_table": perm.view(num_seqs, blocks),
        "seq_lens": torch.full((num_seqs,), context, dtype=torch.int32, device="cuda"),
        "query_start_loc": torch.arange(0, num_seqs * q_len + 1, q_len, dtype=torch.int32,
                                        device="cuda"),
        "inv_freq": inv.cuda(), "logit_scale": (mult / d ** 0.5).cuda()}


def fmt(t: dict) -> str:
    return f"{t['median']:8.3f} [{t['p20']:.3f}, {t['p80']:.3f}]"


def bench_decode(shape: str, context: int, num_seqs: int, reps: int, cuda_op: bool) -> dict:
    b = make_batch(shape, context, 1, num_seqs)
    out = torch.empty_like(b["query"])
    args = (out, b["query"], b["key_cache"], b["value_cache"], b["block_table"], b["seq_lens"],
            b["query_start_loc"], b["inv_freq"], b["logit_scale"])
    providers = {}
    if cuda_op:
        providers["cuda"] = lambda: torch.ops.yarn_vllm.paged_attention(*args, None, None, True)
    providers["triton"] = lambda: paged_attention_triton(*args, True, max_query_len=1)
    kv = torch.stack((b["key_cache"], b["value_cache"]))
    kv_copy = torch.empty_like(kv)
    providers["copy"] = lambda: kv_copy.copy_(kv)
    hq, hkv, d = SHAPES[shape]
    kv_bytes = 2 * num_seqs * context * hkv * d * b["key_cache"].element_size()
    row = {"shape": shape, "context": context, "num_seqs": num_seqs, "kv_bytes": kv_bytes}
    for name, fn in providers.items():
        row[name] = measure(fn, reps=reps, warmup=5, device="cuda")
        # copy reads and writes the bytes; attention reads them once
        row[name]["GBps"] = kv_bytes * (2 if name == "copy" else 1) / row[name]["median"] / 1e6
    for name in ("cuda", "triton"):
        if name in row:
            row[f"{name}_share_of_copy_bandwidth"] = row[name]["GBps"] / row["copy"]["GBps"]
    del kv, kv_copy
    del b
    torch.cuda.empty_cache()
    return row


def bench_prefill(shape: str, context: int, reps: int) -> dict:
    b = make_batch(shape, context, context, 1)
    out = torch.empty_like(b["query"])
    hq, hkv, d = SHAPES[shape]
    # speed-of-light: flash attention on contiguous q/k/v already rotated, the kv
    # heads expanded ahead (untimed) so that no GQA support is needed
    group = hq // hkv
    q = b["query"].transpose(0, 1).contiguous()[None]
    k, v = (c.permute(1, 0, 2, 3).reshape(hkv, -1, d).repeat_interleave(group, 0)[None]
            for c in (b["key_cache"], b["value_cache"]))
    providers = {
        "triton": lambda: paged_attention_triton(
            out, b["query"], b["key_cache"], b["value_cache"], b["block_table"], b["seq_lens"],
            b["query_start_loc"], b["inv_freq"], b["logit_scale"], True, max_query_len=context),
        "sdpa_prerotated": lambda: torch.nn.functional.scaled_dot_product_attention(
            q, k, v, is_causal=True)}
    flops = 4 * hq * d * context * context / 2  # causal: half the QK^T and PV products
    row = {"shape": shape, "context": context, "flops": flops}
    for name, fn in providers.items():
        row[name] = measure(fn, reps=reps, warmup=2, device="cuda")
        row[name]["TFLOPs"] = flops / row[name]["median"] / 1e9
    row["triton_over_sdpa"] = row["triton"]["median"] / row["sdpa_prerotated"]["median"]
    del b, q, k, v
    torch.cuda.empty_cache()
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="4k context only")
    parser.add_argument("--batch", type=int, default=32, help="sequences in the batched rows")
    parser.add_argument("--out", default="bench_results/paged_attention_gpu.json")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_paged_attention_gpu: needs a CUDA device")
    cuda_op = ops.has_kernel("paged_attention", "CUDA")
    if not cuda_op:
        print("yarn_vllm._C has no CUDA paged attention: timing Triton only")
    contexts = [4096] if args.quick else [4096, 16384, 32768]
    decode, prefill = [], []
    print("decode, bf16, ms median [p20, p80]")
    for shape in SHAPES:
        for context in contexts:
            for num_seqs in (1, args.batch):
                row = bench_decode(shape, context, num_seqs, reps=30, cuda_op=cuda_op)
                decode.append(row)
                line = f"{shape:8s} ctx {context:6d} x{num_seqs:3d}"
                for name in ("cuda", "triton", "copy"):
                    if name in row:
                        line += f" | {name} {fmt(row[name])} ({row[name]['GBps']:.0f} GB/s)"
                if cuda_op:
                    line += f" | cuda/copy bandwidth {row['cuda_share_of_copy_bandwidth']:.2f}"
                print(line, flush=True)
    print("prefill (one sequence), bf16, ms median [p20, p80]")
    for shape in SHAPES:
        for context in contexts[:2]:
            row = bench_prefill(shape, context, reps=5)
            prefill.append(row)
            print(f"{shape:8s} ctx {context:6d} | triton {fmt(row['triton'])} "
                  f"({row['triton']['TFLOPs']:.0f} TFLOP/s) | sdpa_prerotated "
                  f"{fmt(row['sdpa_prerotated'])} ({row['sdpa_prerotated']['TFLOPs']:.0f} "
                  f"TFLOP/s) | triton/sdpa {row['triton_over_sdpa']:.2f}", flush=True)
    write_json(args.out, {"environment": environment(), "dtype": str(DTYPE),
                          "block_size": BLOCK_SIZE, "decode": decode, "prefill": prefill})


if __name__ == "__main__":
    main()
