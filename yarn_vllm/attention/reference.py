"""fp32 reference for pre-RoPE paged attention: the definition every kernel is tested against.

Layout (all kernels): key_cache and value_cache are [num_blocks, num_kv_heads,
block_size, head_size] views (any strides) holding keys *before* RoPE. Token t
of sequence b sits in block block_table[b, t // block_size], row
t % block_size. The queries of sequence b are the last q_len_b tokens of its
seq_len_b, so query i sits at position seq_len_b - q_len_b + i.
"""

from __future__ import annotations

import torch

from yarn_vllm.ops import rotary_reference


def gather_sequence(cache: torch.Tensor, block_table_row: torch.Tensor, seq_len: int) -> torch.Tensor:
    """One sequence's tokens from a paged cache: [seq_len, num_kv_heads, head_size]."""
    block_size = cache.shape[2]
    num_blocks = (seq_len + block_size - 1) // block_size
    blocks = cache[block_table_row[:num_blocks].long()]  # [n, H, bs, D]
    return blocks.transpose(1, 2).reshape(-1, cache.shape[1], cache.shape[3])[:seq_len]


def paged_attention_reference(query: torch.Tensor, key_cache: torch.Tensor,
                              value_cache: torch.Tensor, block_table: torch.Tensor,
                              seq_lens: torch.Tensor, query_start_loc: torch.Tensor,
                              inv_freq: torch.Tensor, logit_scale: torch.Tensor,
                              is_neox: bool = True,
                              angle_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Causal attention with per-sequence RoPE frequencies applied to q and cached k.

    query: [T, H_q, D], before RoPE; block_table: [B, max_blocks]; seq_lens: [B];
    query_start_loc: [B + 1]; inv_freq: [B, rotary_dim // 2]; logit_scale: [B]
    (softmax scale times mscale(s)**2). Angles position * inv_freq are formed in
    `angle_dtype`: fp32 as HF and vLLM do, or float64 for kernels that are more exact
    than that at long positions. Returns fp32 [T, H_q, D].
    """
    num_q_heads = query.shape[1]
    out = torch.zeros(query.shape, dtype=torch.float32, device=query.device)
    for b in range(block_table.shape[0]):
        start, end = int(query_start_loc[b]), int(query_start_loc[b + 1])
        seq_len = int(seq_lens[b])
        if end == start:
            continue
        keys = gather_sequence(key_cache, block_table[b], seq_len)
        values = gather_sequence(value_cache, block_table[b], seq_len).float()
        key_pos = torch.arange(seq_len, device=query.device)
        q_pos = key_pos[seq_len - (end - start):]
        q = rotary_reference(query[start:end], q_pos, inv_freq[b], 1.0, is_neox, angle_dtype)
        k = rotary_reference(keys, key_pos, inv_freq[b], 1.0, is_neox, angle_dtype)
        group = num_q_heads // k.shape[1]
        k = k.repeat_interleave(group, dim=1)
        v = values.repeat_interleave(group, dim=1)
        logits = torch.einsum("qhd,khd->hqk", q, k) * float(logit_scale[b])
        logits.masked_fill_(key_pos[None, None, :] > q_pos[None, :, None], float("-inf"))
        out[start:end] = torch.einsum("hqk,khd->qhd", logits.softmax(-1), v)
    return out
