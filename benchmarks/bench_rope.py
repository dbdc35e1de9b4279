"""Rotary op benchmark: ours against vLLM's op and plain PyTorch, on the same tensors.

Providers (each on identical inputs, in one run):
  ours         yarn_vllm rotary op, cos/sin computed on the fly (what the plugin runs)
  ours_table   the same kernel reading a precomputed fp32 cos/sin table
  vllm         vLLM's own rotary op (torch.ops._C.rotary_embedding) with its YaRN
               table in the model dtype, exactly as vLLM's YaRN layer calls it
  torch        the pure-PyTorch fallback (fp32 maths)
  copy         torch copy_ of the same number of bytes: the bandwidth roofline

Prints ms (median [p20, p80]), the ratio vllm_time / ours_time (>1 means we
are faster) and our effective bandwidth as a share of copy's; writes JSON.

  python benchmarks/bench_rope.py [--device cpu|cuda] [--quick] [--out FILE]
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from timing import environment, measure, write_json  # noqa: E402

from yarn_vllm import yarn_math  # noqa: E402
from yarn_vllm.ops import extension_supports, rotary_embedding_, rotary_embedding_torch_  # noqa: E402

FACTOR, ORIGINAL, THETA = 4.0, 8192, 1e5
HEADS_Q, HEADS_K = 32, 8


def vllm_rotary():
    """vLLM's rotary op, or None where vLLM is not installed (the GPU check machine)."""
    try:
        from vllm import _custom_ops as ops
        return ops.rotary_embedding
    except Exception:  # noqa: BLE001 - any import failure means "not available"
        return None


def run_case(tokens: int, head_dim: int, device: str, dtype: torch.dtype, reps: int) -> dict:
    inv_freq = yarn_math.yarn_inv_freq(head_dim, THETA, FACTOR, ORIGINAL).to(device)
    mscale = yarn_math.yarn_mscale(FACTOR)
    max_pos = int(FACTOR * ORIGINAL)
    angles = torch.outer(torch.arange(max_pos, dtype=torch.float32), inv_freq.cpu())
    table32 = torch.cat((angles.cos(), angles.sin()), -1).to(device)
    vllm_table = (table32 * mscale).to(dtype)  # what vLLM's YaRN layer hands its op
    gen = torch.Generator().manual_seed(0)
    positions = torch.randint(0, max_pos, (tokens,), generator=gen).to(device)
    q0 = torch.randn(tokens, HEADS_Q * head_dim, generator=gen).to(device, dtype)
    k0 = torch.randn(tokens, HEADS_K * head_dim, generator=gen).to(device, dtype)
    q, k = q0.clone(), k0.clone()

    def reset():
        q.copy_(q0)
        k.copy_(k0)

    providers = {}
    if extension_supports(torch.device(device)):
        providers["ours"] = lambda: rotary_embedding_(positions, q, k, inv_freq, mscale,
                                                      head_dim, True)
        providers["ours_table"] = lambda: rotary_embedding_(positions, q, k, inv_freq, mscale,
                                                            head_dim, True, table32)
    vllm_op = vllm_rotary()
    if vllm_op is not None:
        providers["vllm"] = lambda: vllm_op(positions, q, k, head_dim, vllm_table, True)
    providers["torch"] = lambda: rotary_embedding_torch_(positions, q, k, inv_freq, mscale,
                                                         head_dim, True)
    flat = torch.cat((q0.flatten(), k0.flatten()))
    dst = torch.empty_like(flat)
    providers["copy"] = lambda: dst.copy_(flat)

    nbytes = 2 * flat.numel() * flat.element_size()  # read + write
    row = {"tokens": tokens, "head_dim": head_dim, "dtype": str(dtype).split(".")[-1],
           "bytes_moved": nbytes}
    for name, fn in providers.items():
        n = reps if tokens < 16384 else max(5, reps // 4)
        row[name] = measure(fn, reps=n, setup=reset, device=device)
    base = row.get("ours")
    if base:
        if "vllm" in row:
            row["speedup_vs_vllm"] = row["vllm"]["median"] / base["median"]
        row["fly_over_table"] = row["ours"]["median"] / row["ours_table"]["median"]
        row["gbps_ours"] = nbytes / base["median"] / 1e6
        row["gbps_copy"] = nbytes / row["copy"]["median"] / 1e6
        row["share_of_copy"] = row["gbps_ours"] / row["gbps_copy"]
    return row


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--quick", action="store_true", help="fewer sizes and repetitions")
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--out", default="bench_results/rope.json")
    args = ap.parse_args(argv)
    dtype = getattr(torch, args.dtype)
    sizes = [1, 256, 4096, 16384] if args.quick else [1, 16, 256, 1024, 4096, 16384, 65536]
    reps = 10 if args.quick else args.reps
    rows = []
    print(f"{'tokens':>7} {'D':>4} {'ours ms':>22} {'vllm ms':>22} {'torch ms':>10} "
          f"{'vs vllm':>8} {'GB/s':>7} {'%copy':>6} {'fly/table':>9}")
    for head_dim in (64, 128):
        for tokens in sizes:
            r = run_case(tokens, head_dim, args.device, dtype, reps)
            rows.append(r)

            def fmt(p):
                return (f"{r[p]['median']:8.4f} [{r[p]['p20']:.3f},{r[p]['p80']:.3f}]"
                        if p in r else f"{'-':>22}")
            print(f"{tokens:>7} {head_dim:>4} {fmt('ours')} {fmt('vllm')} "
                  f"{r['torch']['median']:10.3f} {r.get('speedup_vs_vllm', float('nan')):7.2f}x "
                  f"{r.get('gbps_ours', float('nan')):7.1f} {100 * r.get('share_of_copy', float('nan')):5.0f}% "
                  f"{r.get('fly_over_table', float('nan')):9.2f}", flush=True)
    write_json(args.out, {"benchmark": "rope", "device": args.device, "heads_q": HEADS_Q,
                          "heads_k": HEADS_K, "factor": FACTOR, "env": environment(),
                          "rows": rows})


if __name__ == "__main__":
    main()
