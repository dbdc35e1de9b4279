"""Rotary op benchmark: ours (one scale and per-token scales) against vLLM's op, same tensors.

Providers, timed in turns every repetition (load from other processes falls on all alike):
  ours           yarn_vllm's op, one scale (static mode), with the layer's buffers as they
                 are (inv_freq [1, d/2], mscale [1]): no per-call conversion
  ours_request   the same op with per-token scales: 4 scale rows, tokens mixed at random
                 (request mode)
  vllm           vLLM's own op (vllm._custom_ops.rotary_embedding) with its YaRN table
                 in the model dtype, exactly as vLLM's YaRN layer calls it
  torch          (--with-torch) the pure-PyTorch fallback (fp32 maths)
  copy           torch copy_ of the same bytes: the bandwidth roofline

Prints ms (median [p20, p80]) and vllm_time / ours_time (> 1: we are faster), and
writes JSON with every quantile and the machine's load.

  python benchmarks/bench_rope.py [--device cpu|cuda] [--quick] [--threads N] [--out FILE]
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from timing import environment, measure_interleaved, write_json  # noqa: E402

from yarn_vllm import yarn_math  # noqa: E402
from yarn_vllm.ops import extension_supports, rotary_embedding_, rotary_embedding_torch_  # noqa: E402

FACTOR, ORIGINAL, THETA = 4.0, 8192, 1e5
REQUEST_FACTORS = (1.0, 2.0, 3.0, 4.0)
HEADS_Q, HEADS_K = 32, 8


def vllm_rotary():
    """vLLM's rotary op, or None where vLLM is not installed (the GPU check machine)."""
    try:
        from vllm import _custom_ops as ops
        return ops.rotary_embedding
    except Exception:  # noqa: BLE001 - any import failure means "not available"
        return None


def run_case(tokens: int, head_dim: int, device: str, dtype: torch.dtype, reps: int,
             with_torch: bool) -> dict:
    inv_freq = yarn_math.yarn_inv_freq(head_dim, THETA, FACTOR, ORIGINAL).to(device)
    mscale = yarn_math.yarn_mscale(FACTOR)
    static_rows = inv_freq[None].contiguous()
    static_mscale = torch.tensor([mscale], device=device)
    rows = torch.stack([yarn_math.yarn_inv_freq(head_dim, THETA, s, ORIGINAL)
                        for s in REQUEST_FACTORS]).to(device)
    mscales = torch.tensor([yarn_math.yarn_mscale(s) for s in REQUEST_FACTORS], device=device)
    max_pos = int(FACTOR * ORIGINAL)
    angles = torch.outer(torch.arange(max_pos, dtype=torch.float32), inv_freq.cpu())
    vllm_table = (torch.cat((angles.cos(), angles.sin()), -1) * mscale).to(device, dtype)
    gen = torch.Generator().manual_seed(0)
    positions = torch.randint(0, max_pos, (tokens,), generator=gen).to(device)
    scale_index = torch.randint(0, len(REQUEST_FACTORS), (tokens,), generator=gen,
                                dtype=torch.int32).to(device)
    q0 = torch.randn(tokens, HEADS_Q * head_dim, generator=gen).to(device, dtype)
    k0 = torch.randn(tokens, HEADS_K * head_dim, generator=gen).to(device, dtype)
    q, k = q0.clone(), k0.clone()

    def reset():
        q.copy_(q0)
        k.copy_(k0)

    providers = {}
    if extension_supports(torch.device(device)):
        providers["ours"] = lambda: rotary_embedding_(positions, q, k, static_rows, static_mscale,
                                                      head_dim, True)
        providers["ours_request"] = lambda: rotary_embedding_(
            positions, q, k, rows, mscales, head_dim, True, scale_index=scale_index)
    vllm_op = vllm_rotary()
    if vllm_op is not None:
        providers["vllm"] = lambda: vllm_op(positions, q, k, head_dim, vllm_table, True)
    if with_torch:
        providers["torch"] = lambda: rotary_embedding_torch_(
            positions, q, k, rows, mscales, head_dim, True, scale_index)
    flat = torch.cat((q0.flatten(), k0.flatten()))
    dst = torch.empty_like(flat)
    providers["copy"] = lambda: dst.copy_(flat)

    row = {"tokens": tokens, "head_dim": head_dim, "dtype": str(dtype).split(".")[-1],
           "bytes_moved": 2 * flat.numel() * flat.element_size()}  # read + write
    row.update(measure_interleaved(providers, reps=reps, setup=reset, device=device))
    if "vllm" in row:
        for ours in ("ours", "ours_request"):
            if ours in row:
                row[f"vllm_over_{ours}"] = row["vllm"]["median"] / row[ours]["median"]
    return row


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--quick", action="store_true", help="256 and 4096 tokens only")
    ap.add_argument("--reps", type=int, default=200, help="repetitions up to 1k tokens")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    ap.add_argument("--with-torch", action="store_true", help="time the PyTorch fallback too")
    ap.add_argument("--out", default="bench_results/rope.json")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    sizes = [256, 4096] if args.quick else [1, 16, 256, 1024, 4096, 16384]
    rows = []
    print(f"{'tokens':>7} {'D':>4} {'ours ms':>26} {'ours_request ms':>26} {'vllm ms':>26} "
          f"{'vllm/ours':>9} {'vllm/request':>12}")

    def fmt(r, p):
        return (f"{r[p]['median']:9.4f} [{r[p]['p20']:.4f},{r[p]['p80']:.4f}]"
                if p in r else f"{'-':>26}")

    for head_dim in (64, 128):
        for tokens in sizes:
            reps = args.reps if tokens <= 1024 else max(10, args.reps * 1024 // tokens)
            r = run_case(tokens, head_dim, args.device, dtype, reps, args.with_torch)
            rows.append(r)
            print(f"{tokens:>7} {head_dim:>4} {fmt(r, 'ours')} {fmt(r, 'ours_request')} "
                  f"{fmt(r, 'vllm')} {r.get('vllm_over_ours', float('nan')):8.3f}x "
                  f"{r.get('vllm_over_ours_request', float('nan')):11.3f}x", flush=True)
    write_json(args.out, {"benchmark": "rope", "device": args.device, "heads_q": HEADS_Q,
                          "heads_k": HEADS_K, "factor": FACTOR,
                          "request_factors": REQUEST_FACTORS, "env": environment(),
                          "rows": rows})


if __name__ == "__main__":
    main()
