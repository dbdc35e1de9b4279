"""Pre-RoPE paged attention on the GPU: what rotating keys on load costs.

Decode (one query token per sequence), one sequence and a batch, at 4k, 16k
and 32k context, for SmolLM2-like (9 q heads, 3 kv heads, d=64) and
Llama-8B-like (32/8, d=128) shapes, bf16 cache, block_size 16. Providers:
  cuda_rotate      our CUDA decode kernel, keys rotated as they are loaded (Dynamic YaRN)
  cuda_prerotated  the very same kernel built with ROTATE=false (keys cached after
                   RoPE, as static YaRN serves them): the baseline of the ratio
  triton           the Triton kernel (rotates on load), on the same batch
Prefill (one sequence, all its tokens queried): the Triton kernel against
torch's SDPA (flash) on contiguous, pre-rotated q/k/v as a speed-of-light.

Prints ms (median [p20, p80]), rotate / prerotated ratios (1.0 = rotation is
free) and decode bandwidth; writes JSON.

  python benchmarks/bench_paged_attention_gpu.py [--quick] [--out FILE]
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from timing import environment, measure, write_json  # noqa: E402

from yarn_vllm.attention.rope_spec import DynamicRope  # noqa: E402
from yarn_vllm.attention.triton_paged import paged_attention_triton  # noqa: E402

SHAPES = {"smollm2": (9, 3, 64), "llama8b": (32, 8, 128)}
ORIGINAL = 8192  # trained length: 16k and 32k contexts run at s = 2 and 4
BLOCK_SIZE = 16
DTYPE = torch.bfloat16


def has_cuda_op() -> bool:
    from yarn_vllm import ops
    try:
        return ops.HAS_EXTENSION and torch._C._dispatch_has_kernel_for_dispatch_key(
            "yarn_vllm::paged_attention_decode_cuda", "CUDA")
    except RuntimeError:  # a build without the CUDA sources does not define the op
        return False


def make_batch(shape: str, context: int, q_len: int, num_seqs: int) -> dict:
    """num_seqs sequences of `context` tokens, the last q_len of each queried."""
    hq, hkv, d = SHAPES[shape]
    gen = torch.Generator(device="cuda").manual_seed(0)
    blocks = -(-context // BLOCK_SIZE)
    num_blocks = num_seqs * blocks
    perm = torch.randperm(num_blocks, device="cuda", generator=gen).int()
    rope = DynamicRope(head_size=d, rotary_dim=d, base=5e5, original_max_position=ORIGINAL)
    inv, mult = rope.per_sequence([context] * num_seqs)
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
        # rotate=False reads the same (unrotated) cache: the numbers differ, the
        # memory traffic and the rest of the work do not
        providers["cuda_rotate"] = lambda: torch.ops.yarn_vllm.paged_attention_decode_cuda(
            *args, True, True)
        providers["cuda_prerotated"] = lambda: torch.ops.yarn_vllm.paged_attention_decode_cuda(
            *args, True, False)
    providers["triton"] = lambda: paged_attention_triton(*args, True, max_query_len=1)
    hq, hkv, d = SHAPES[shape]
    kv_bytes = 2 * num_seqs * context * hkv * d * b["key_cache"].element_size()
    row = {"shape": shape, "context": context, "num_seqs": num_seqs, "kv_bytes": kv_bytes}
    for name, fn in providers.items():
        row[name] = measure(fn, reps=reps, warmup=5, device="cuda")
        row[name]["GBps"] = kv_bytes / row[name]["median"] / 1e6
    if cuda_op:
        row["rotate_over_prerotated"] = (row["cuda_rotate"]["median"]
                                         / row["cuda_prerotated"]["median"])
    row["triton_over_cuda_rotate"] = (row["triton"]["median"] / row["cuda_rotate"]["median"]
                                      if cuda_op else None)
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
    cuda_op = has_cuda_op()
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
                for name in ("cuda_rotate", "cuda_prerotated", "triton"):
                    if name in row:
                        line += f" | {name} {fmt(row[name])} ({row[name]['GBps']:.0f} GB/s)"
                if cuda_op:
                    line += f" | rotate/prerotated {row['rotate_over_prerotated']:.3f}"
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
