"""Triton pre-RoPE paged attention for any batch: prefill, chunked prefill and decode mixed.

`paged_attention_triton` has the semantics of `reference.paged_attention_reference`
(keys cached before RoPE, each sequence rotated with its own YaRN frequencies and
its logits multiplied by its own scale). Queries and keys are rotated in fp32 as
they are loaded; for bf16/fp16 caches the rotated operands are then rounded to the
cache dtype for the tensor-core dots (fp32 accumulation, online softmax), as a
pre-rotated bf16 cache would hold them. triton is imported on the first call,
so this module imports on machines without it.
"""

from __future__ import annotations

import os

import torch

from yarn_vllm import ops


def _next_pow2(x: int) -> int:
    return 1 << max(0, (x - 1).bit_length())


def _check(out, query, key_cache, value_cache, block_table, seq_lens, query_start_loc,
           inv_freq, logit_scale, is_neox) -> None:
    """The paged_attention op's own argument checks (csrc/paged_attention_checks.h), run by
    the extension's paged_attention_check op: one contract for every implementation. Raises
    RuntimeError naming the argument; values are checked for CPU tensors and, for CUDA
    ones, under YARN_VLLM_CHECK_ARGS=1."""
    if not ops.HAS_EXTENSION:
        raise RuntimeError("paged_attention_triton: needs yarn_vllm._C for its argument checks. "
                           "Fix: build the extension (pip install --no-build-isolation -e .).")
    torch.ops.yarn_vllm.paged_attention_check(out, query, key_cache, value_cache, block_table,
                                              seq_lens, query_start_loc, inv_freq, logit_scale,
                                              None, None, is_neox)


def paged_attention_triton(out: torch.Tensor, query: torch.Tensor, key_cache: torch.Tensor,
                           value_cache: torch.Tensor, block_table: torch.Tensor,
                           seq_lens: torch.Tensor, query_start_loc: torch.Tensor,
                           inv_freq: torch.Tensor, logit_scale: torch.Tensor,
                           is_neox: bool = True, *, max_query_len: int | None = None,
                           num_splits: int | None = None, block_m: int | None = None,
                           block_n: int | None = None) -> None:
    """Causal paged attention over pre-RoPE keys, written into `out`.

    The op's contract (csrc/paged_attention_checks.h), checked by the op's own code:
    out, query: [T, H_q, D]; key_cache, value_cache: [num_blocks, H_kv, block_size, D]
    (any strides but a contiguous last dim); block_table: [B, max_blocks]
    int32; seq_lens: [B] int32; query_start_loc: [B + 1] int32; inv_freq:
    [B, rotary_dim / 2] fp32; logit_scale: [B] fp32. max_query_len (the largest
    q_len_b) sizes the grid; passing it avoids a device-to-host sync.
    num_splits splits every context over that many programs (merged after);
    None picks it from the GPU's size. block_m / block_n override the tile sizes
    (tests use small ones).
    """
    _check(out, query, key_cache, value_cache, block_table, seq_lens, query_start_loc, inv_freq,
           logit_scale, is_neox)
    num_seqs = block_table.shape[0]
    if num_seqs == 0 or query.shape[0] == 0:
        return
    if max_query_len is None:
        max_query_len = int((query_start_loc[1:] - query_start_loc[:-1]).max())
    if max_query_len == 0:
        return
    from yarn_vllm.attention._triton_paged_kernel import merge_splits_kernel, paged_attention_kernel

    head_size = query.shape[2]
    num_kv_heads = key_cache.shape[1]
    group = query.shape[1] // num_kv_heads
    half = inv_freq.shape[1]
    tail = head_size - 2 * half
    emulate = os.environ.get("TRITON_INTERPRET", "0") == "1"
    # tl.dot needs every dimension >= 16
    block_m = block_m or (16 if max_query_len * group <= 16 else 64)
    block_n = block_n or 64
    tiles = triton_cdiv(max_query_len * group, block_m)
    # the block table's width bounds every context without a device sync
    max_context = block_table.shape[1] * key_cache.shape[2]
    if num_splits is None:
        num_splits = _auto_splits(query, tiles * num_seqs * num_kv_heads, max_context, head_size)
    split_size = triton_cdiv(triton_cdiv(max_context, num_splits), block_n) * block_n
    ws_acc = ws_ml = out  # unused unless split
    if num_splits > 1:
        rows = query.shape[0] * query.shape[1] * num_splits
        ws_acc = torch.empty(rows * head_size, dtype=torch.float32, device=query.device)
        ws_ml = torch.empty(rows * 2, dtype=torch.float32, device=query.device)
    grid = (tiles, num_seqs, num_kv_heads * num_splits)
    paged_attention_kernel[grid](
        out, query, key_cache, value_cache, block_table, seq_lens, query_start_loc,
        inv_freq, logit_scale, ws_acc, ws_ml,
        *query.stride(), *out.stride(), *key_cache.stride(), *value_cache.stride(),
        block_table.stride(0), inv_freq.stride(0),
        key_cache.shape[2], half, head_size, query.shape[1], num_splits, split_size,
        GROUP=group, BLOCK_M=block_m, BLOCK_N=block_n,
        BLOCK_HALF=max(16, _next_pow2(half)), BLOCK_TAIL=max(16, _next_pow2(max(tail, 1))),
        BLOCK_D=max(16, _next_pow2(head_size)), HAS_TAIL=tail > 0, IS_NEOX=bool(is_neox),
        # fp32 caches get true fp32 dots; tf32 would lose the reference's precision
        PRECISION="ieee" if key_cache.dtype == torch.float32 or emulate else "tf32",
        EMULATE=emulate, SPLIT=num_splits > 1)
    if num_splits > 1:
        merge_splits_kernel[(tiles, num_seqs, num_kv_heads)](
            out, query_start_loc, seq_lens, ws_acc, ws_ml, *out.stride(),
            head_size, query.shape[1], num_splits, split_size,
            GROUP=group, BLOCK_M=block_m, BLOCK_D=max(16, _next_pow2(head_size)))


_WORKSPACE_BYTES = 64 << 20


def _auto_splits(query: torch.Tensor, programs: int, max_context: int, head_size: int) -> int:
    """Context splits that fill the GPU when the batch alone does not (few long decodes)."""
    if query.device.type != "cuda":
        return 1
    target = 2 * torch.cuda.get_device_properties(query.device).multi_processor_count
    if programs >= target:
        return 1
    by_work = min(triton_cdiv(target, programs), triton_cdiv(max_context, 512), 64)
    by_memory = _WORKSPACE_BYTES // (4 * query.shape[0] * query.shape[1] * (head_size + 2))
    return max(1, min(by_work, by_memory))


def triton_cdiv(a: int, b: int) -> int:
    return -(-a // b)
