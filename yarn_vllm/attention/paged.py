"""Pre-RoPE paged attention: one entry point over the CPU op, the CUDA decode op and Triton.

Every implementation has the semantics of `reference.paged_attention_reference` and the
argument contract of csrc/paged_attention_checks.h (the Triton wrapper runs those very
checks). `kernel="auto"` picks:

  * CPU tensors: the C++ op (yarn_vllm._C);
  * CUDA tensors, a decode batch (one query token per sequence) and the CUDA op built:
    the CUDA decode op;
  * any other CUDA batch: the Triton kernel (prefill, chunked prefill, mixed).

`kernel="triton"` forces Triton, even on CPU tensors under TRITON_INTERPRET=1 (so the
GPU's route can be tested without a GPU); "cpu" and "cuda" force the C++ ops.
"""

from __future__ import annotations

import os

import torch

from yarn_vllm import ops

KERNELS = ("auto", "cpu", "cuda", "triton")
# Which compiled kernels the extension registers, asked once: the dispatcher query
# costs microseconds, and paged_attention runs once per layer per step.
_COMPILED = {key: ops.has_kernel("paged_attention", key) for key in ("CPU", "CUDA")}


def choose_kernel(query: torch.Tensor, num_seqs: int, query_start_loc: torch.Tensor,
                  max_query_len: int | None, kernel: str = "auto") -> str:
    """The implementation `paged_attention` runs: "cpu", "cuda" or "triton".

    Raises ValueError for an unknown `kernel`, RuntimeError where none serves the device.
    """
    if kernel not in KERNELS:
        raise ValueError(f"paged_attention: kernel {kernel!r} is not one of {KERNELS}")
    device = query.device.type
    if kernel == "auto":
        if device == "cpu":
            kernel = "cpu"
        elif device == "cuda":
            decode = query.shape[0] == num_seqs and _max_query_len(
                query_start_loc, max_query_len) == 1
            kernel = "cuda" if decode and _COMPILED["CUDA"] else "triton"
        else:
            raise RuntimeError(f"paged_attention: no implementation for {device} tensors. "
                               "Fix: run on CPU or CUDA.")
    if kernel in ("cpu", "cuda") and not _COMPILED[kernel.upper()]:
        raise _not_built(kernel)
    if kernel == "triton" and device == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError("paged_attention: Triton runs CPU tensors only in its interpreter. "
                           "Fix: set TRITON_INTERPRET=1 before triton is imported.")
    return kernel


def cpu_op():
    """The compiled CPU op, resolved once by a caller that runs it every layer (its
    arguments as `paged_attention`'s, plus angles, angle_start and is_neox in schema order).

    Raises RuntimeError, with the fix, if the extension has no CPU kernel.
    """
    if not _COMPILED["CPU"]:
        raise _not_built("cpu")
    return torch.ops.yarn_vllm.paged_attention.default


def _not_built(kernel: str) -> RuntimeError:
    return RuntimeError(f"paged_attention: yarn_vllm._C has no {kernel.upper()} kernel. "
                        "Fix: build the extension on a machine with "
                        f"{'CUDA torch and nvcc' if kernel == 'cuda' else 'a C++ compiler'}.")


def _max_query_len(query_start_loc: torch.Tensor, max_query_len: int | None) -> int:
    if max_query_len is not None:
        return max_query_len
    if query_start_loc.shape[0] < 2:
        return 0
    return int((query_start_loc[1:] - query_start_loc[:-1]).max())  # a host sync


def paged_attention(out: torch.Tensor, query: torch.Tensor, key_cache: torch.Tensor,
                    value_cache: torch.Tensor, block_table: torch.Tensor, seq_lens: torch.Tensor,
                    query_start_loc: torch.Tensor, inv_freq: torch.Tensor,
                    logit_scale: torch.Tensor, is_neox: bool, *,
                    angles: torch.Tensor | None = None, angle_start: torch.Tensor | None = None,
                    max_query_len: int | None = None, kernel: str = "auto") -> None:
    """Causal attention over keys cached before RoPE, each sequence rotated with its own
    frequencies and its logits multiplied by its own scale; written into `out`.

    out, query: [T, H_q, D], query before RoPE; key_cache, value_cache:
    [num_blocks, H_kv, block_size, D] views; block_table: [B, max_blocks] int32;
    seq_lens: [B] int32; query_start_loc: [B + 1] int32; inv_freq: [B, rotary_dim // 2]
    fp32; logit_scale: [B] fp32 (softmax scale x mscale(s)**2). angles / angle_start:
    the CPU kernel's optional angle table (attention/angles.py), ignored elsewhere.
    max_query_len: the largest q_len, if known; on CUDA it spares a host sync.
    """
    chosen = choose_kernel(query, block_table.shape[0], query_start_loc, max_query_len, kernel)
    if chosen == "triton":
        from yarn_vllm.attention.triton_paged import paged_attention_triton

        paged_attention_triton(out, query, key_cache, value_cache, block_table, seq_lens,
                               query_start_loc, inv_freq, logit_scale, is_neox,
                               max_query_len=max_query_len)
        return
    torch.ops.yarn_vllm.paged_attention(out, query, key_cache, value_cache, block_table, seq_lens,
                                        query_start_loc, inv_freq, logit_scale, angles,
                                        angle_start, is_neox)
