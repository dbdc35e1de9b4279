"""Attention cost per engine step: Dynamic YaRN (ours, keys cached before RoPE and rotated
on load) against vLLM's CPU_ATTN kernel on post-RoPE keys, same shapes, one run.

Ours runs as the engine runs it: the backend's metadata builder once per step (scales,
frequencies, angle table), then `--layers` calls of the backend's forward, which take
the C++ op for decode and prefill alike. vLLM's side is timed
two ways, in the same rounds: as its engine runs it (`vllm`: CPU_ATTN's metadata builder
once per step, then `--layers` calls of its backend's forward), and its bare kernel
(`vllm_op`: `--layers` kernel calls on pre-split caches with the scheduler metadata made
once), which leaves out the per-step and per-layer work that both engines pay. In the
engine-path rows each layer also writes the step's new keys and values through its
backend's `do_kv_cache_update`, and vLLM's side rotates q and k with its rotary op first
(ours caches keys before RoPE and rotates inside attention; its rotary layer returns q
and k untouched). Decode: one sequence, one new token, at each context length. Prefill:
one prompt in one step. Each layer reads its own KV cache, as in an engine step
(`--caches shared` gives every layer the same one, which then stays in the CPU's caches
up to several thousand keys: the kernels' compute alone).

    .venv/bin/python benchmarks/bench_dynamic_attention.py --contexts 4096,16384,32768
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from types import SimpleNamespace

import torch

sys.path.insert(0, os.path.dirname(__file__))
from timing import environment, measure_interleaved, write_json  # noqa: E402

import yarn_vllm.ops  # noqa: E402,F401  (loads the extension)
from vllm.v1.attention.backends.cpu_attn import (CPUAttentionBackendImpl,  # noqa: E402
                                                 CPUAttentionMetadataBuilder,
                                                 _get_attn_isa)
from yarn_vllm.attention.backend import (YarnDynamicAttentionImpl,  # noqa: E402
                                         YarnDynamicMetadataBuilder)
from yarn_vllm.tools.bench.report import cpu_platform, platform_line  # noqa: E402
from yarn_vllm.yarn.config import YarnConfig  # noqa: E402
from yarn_vllm.yarn.scale_policy import ScalePolicy  # noqa: E402


def _paged_cache(num_blocks, kv_heads, block_size, head, dtype):
    """[num_blocks, H_kv, 2 * block_size, head] laid out as vLLM's CPU cache view; K | V halves."""
    cache = torch.randn(num_blocks, kv_heads, 2 * block_size, head).to(dtype)
    return cache, cache[:, :, :block_size], cache[:, :, block_size:]


def one_case(ctx, q_len, args, dtype):
    from vllm import _custom_ops as vops

    hq, hkv, head, bs = args.q_heads, args.kv_heads, args.head_size, args.block_size
    nblocks = (ctx + bs - 1) // bs
    # one KV cache per layer, as an engine has (`--caches shared`: one for all layers, which
    # then stays in L3 up to a few thousand keys and leaves the kernels compute-bound)
    caches = args.layers if args.caches == "per-layer" else 1
    ours_caches = [_paged_cache(nblocks, hkv, bs, head, dtype)[0] for _ in range(caches)]
    block_table = torch.arange(nblocks, dtype=torch.int32)[None]
    seq_lens = torch.tensor([ctx], dtype=torch.int32)
    qsl = torch.tensor([0, q_len], dtype=torch.int32)
    query = torch.randn(q_len, hq, head).to(dtype)
    out = torch.empty_like(query)
    # the builder as an engine's vllm_config makes it in dynamic mode: the policy and the
    # layers' softmax scale (its angle tables then kept across steps)
    builder = YarnDynamicMetadataBuilder.detached(ScalePolicy(
        YarnConfig(factor=max(1.0, ctx / args.original_max_position), mode="dynamic",
                   original_max_position=args.original_max_position), head, args.rope_theta),
        softmax_scale=head ** -0.5)

    # vLLM's kernel wants its own packed cache, for the ISA its engine would pick: fill it
    # through its own writer.
    isa = _get_attn_isa(dtype, bs, head)
    vllm_caches = [_paged_cache(nblocks, hkv, bs, head, dtype) for _ in range(caches)]
    keys = torch.randn(ctx, hkv, head).to(dtype)
    for _, vkc, vvc in vllm_caches:
        vops.cpu_attn_reshape_and_cache(keys, keys, vkc, vvc, torch.arange(ctx), isa)
    meta = vops.cpu_attn_get_scheduler_metadata(
        num_reqs=1, num_heads=hq, num_kv_heads=hkv, head_dim=head, seq_lens=seq_lens,
        dtype=dtype, query_start_loc=qsl, causal=True, sliding_window_size=-1, isa=isa,
        enable_kv_split=True)

    def vllm_op_step():
        for i in range(args.layers):
            _, vkc, vvc = vllm_caches[i % caches]
            vops.cpu_attention_with_kv_cache(
                query=query, key_cache=vkc, value_cache=vvc, output=out, query_start_loc=qsl,
                seq_lens=seq_lens, scale=head ** -0.5, causal=True, alibi_slopes=None,
                sliding_window=-1, block_table=block_table, softcap=0.0,
                scheduler_metadata=meta, s_aux=None)

    impl = YarnDynamicAttentionImpl(hq, head, head ** -0.5, hkv, None, None, "auto")
    common = SimpleNamespace(num_reqs=1, num_actual_tokens=q_len, query_start_loc_cpu=qsl,
                             query_start_loc=qsl, seq_lens=seq_lens, max_query_len=q_len,
                             max_seq_len=ctx, block_table_tensor=block_table, causal=True,
                             slot_mapping=torch.arange(ctx - q_len, ctx))
    vllm_builder, vllm_impl, vllm_layer = _vllm_backend(hq, hkv, head, bs, dtype, isa)
    vllm_kv_caches = [c.view(nblocks, hkv, bs, 2 * head) for c, _, _ in vllm_caches]
    # the step's new tokens: their keys and values, positions and cache slots
    new_k, new_v = torch.randn(q_len, hkv, head).to(dtype), torch.randn(q_len, hkv, head).to(dtype)
    positions = torch.arange(ctx - q_len, ctx)
    # vLLM's [max_position, rotary_dim] table of real angles, so that rotating its own copy of
    # q and k in place, layer after layer, keeps their norms (and ours never sees it)
    angles = torch.outer(torch.arange(ctx, dtype=torch.float32),
                         args.rope_theta ** (-torch.arange(0, head, 2) / head))
    cos_sin_cache = torch.cat([angles.cos(), angles.sin()], -1).to(dtype)
    vllm_query, vllm_k = query.clone(), new_k.clone()
    flat_q, flat_k = vllm_query.view(q_len, hq * head), vllm_k.view(q_len, hkv * head)

    def vllm_step():
        meta = CPUAttentionMetadataBuilder.build(vllm_builder, 0, common)
        for i in range(args.layers):
            kv_cache = vllm_kv_caches[i % caches]
            vops.rotary_embedding(positions, flat_q, flat_k, head, cos_sin_cache, True)
            CPUAttentionBackendImpl.do_kv_cache_update(vllm_impl, vllm_layer, vllm_k, new_v,
                                                       kv_cache, common.slot_mapping)
            CPUAttentionBackendImpl.forward(vllm_impl, vllm_layer, vllm_query, None, None,
                                            kv_cache, meta, out)
    flat_out = out.view(q_len, hq * head)

    def ours_step():
        meta = builder.build(0, common)
        for i in range(args.layers):
            kv_cache = ours_caches[i % caches].view(nblocks, hkv, bs, 2 * head)
            impl.do_kv_cache_update(None, new_k, new_v, kv_cache, common.slot_mapping)
            impl.forward(None, query, None, None, kv_cache, meta, flat_out)

    reps = args.reps if q_len == 1 else max(2, args.reps // 5)
    # taking turns, so that load from other processes falls on both alike
    times = measure_interleaved({"vllm": vllm_step, "vllm_op": vllm_op_step, "ours": ours_step},
                                reps=reps, warmup=1,
                                clock=time.thread_time if args.clock == "cpu" else time.perf_counter)
    vllm, vllm_op, ours = times["vllm"], times["vllm_op"], times["ours"]
    row = {"context": ctx, "q_len": q_len, "dtype": str(dtype).split(".")[-1], "vllm_isa": isa,
           "caches": args.caches,
           "vllm_ms": vllm["median"], "vllm_op_ms": vllm_op["median"], "ours_ms": ours["median"],
           "ratio_ours_over_vllm": ours["median"] / vllm["median"],
           "ratio_ours_over_vllm_op": ours["median"] / vllm_op["median"],
           "vllm": vllm, "vllm_op": vllm_op, "ours": ours}
    kind = "decode " if q_len == 1 else "prefill"
    print(f"{kind} ctx {ctx:6d} {row['dtype']:8s} vllm {vllm['median']:9.2f} ms  "
          f"(op alone {vllm_op['median']:9.2f})  ours {ours['median']:9.2f} ms  "
          f"ours/vllm {row['ratio_ours_over_vllm']:.2f}  "
          f"ours/op alone {row['ratio_ours_over_vllm_op']:.2f}", flush=True)
    return row


def _vllm_backend(num_heads, num_kv_heads, head, block_size, dtype, isa):
    """CPU_ATTN's builder, impl and layer state for a decoder layer, as vLLM's __init__s set
    them (they read an engine's vllm_config, which this benchmark has not got)."""
    from vllm.v1.attention.backend import AttentionType

    builder = SimpleNamespace(is_cross_attention=False, is_encoder_only_attention=False,
                              block_size=block_size, num_heads=num_heads,
                              num_kv_heads=num_kv_heads, head_dim=head, dtype=dtype,
                              window_size=-1, isa=isa, kv_cache_dtype="auto")
    impl = SimpleNamespace(attn_type=AttentionType.DECODER, use_zentorch_sdpa=False, sinks=None,
                           scale=head ** -0.5, alibi_slopes=None, sliding_window=-1,
                           logits_soft_cap=0, kv_cache_dtype="auto")
    layer = SimpleNamespace(isa=isa, _k_scale_float=1.0, _v_scale_float=1.0)
    return builder, impl, layer


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--contexts", default="4096,16384,32768")
    p.add_argument("--prefill", default="2048,4096", help="prompt lengths for the prefill rows")
    p.add_argument("--dtypes", default="float32")
    p.add_argument("--layers", type=int, default=30, help="attention calls per step (SmolLM2: 30)")
    p.add_argument("--q-heads", type=int, default=9)
    p.add_argument("--kv-heads", type=int, default=3)
    p.add_argument("--head-size", type=int, default=64)
    p.add_argument("--block-size", type=int, default=128)
    p.add_argument("--rope-theta", type=float, default=100000.0)
    p.add_argument("--original-max-position", type=int, default=8192)
    p.add_argument("--caches", choices=("per-layer", "shared"), default="per-layer",
                   help="per-layer: a KV cache per layer, as an engine step reads them; shared: "
                        "one for every layer (it stays in cache: the kernels' compute alone)")
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                   help="cpu: this thread's CPU time (with --threads 1), steadier on a loaded machine")
    p.add_argument("--out", default="bench_results/dynamic_attention.json")
    args = p.parse_args(argv)
    if args.clock == "cpu" and args.threads != 1:
        p.error("--clock cpu times this thread alone: pass --threads 1")
    if args.threads:
        torch.set_num_threads(args.threads)
    platform = cpu_platform(args.dtypes.split(","), args.block_size, args.head_size)
    print(platform_line(platform), flush=True)
    rows = []
    for name in args.dtypes.split(","):
        dtype = getattr(torch, name)
        for ctx in (int(c) for c in args.contexts.split(",") if c):
            rows.append(one_case(ctx, 1, args, dtype))
        for n in (int(c) for c in args.prefill.split(",") if c):
            rows.append(one_case(n, n, args, dtype))
    platform["loadavg_1m_after"] = os.getloadavg()[0]
    write_json(args.out, {"env": environment(), "platform": platform, "args": vars(args),
                          "rows": rows})
    print(f"load after: {platform['loadavg_1m_after']:.2f}")


if __name__ == "__main__":
    main()
