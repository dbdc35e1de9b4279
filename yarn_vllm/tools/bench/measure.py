"""Turn one batch's step timeline into prefill, decode and end-to-end throughput.

A batch of B prompts of L tokens each generates G tokens per prompt. The engine is stepped
by hand; after every step we know how many tokens each request holds. The prefill phase runs
from the first step to the step at which the last request received its first token (all
prompt tokens are then in the KV cache); the decode phase is every step after that, which
only decodes. Tokens that early requests generated while later prompts were still being
prefilled are counted in the prefill phase, not in decode.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Step:
    """Wall time at the end of an engine step and each request's token count after it."""

    t_end: float
    tokens: dict  # request id -> generated tokens so far


def summarise(t_start: float, steps: list[Step], prompt_len: int, batch: int,
              output_tokens: int) -> dict:
    """Throughput numbers for one batch; `steps` in order, every request finished at the end."""
    first_token = {}
    prefill_end = None
    for i, step in enumerate(steps):
        for rid, n in step.tokens.items():
            if n >= 1 and rid not in first_token:
                first_token[rid] = step.t_end
        if prefill_end is None and len(first_token) == batch:
            prefill_end = i
    if prefill_end is None:
        raise ValueError(f"only {len(first_token)} of {batch} requests produced a token")
    t_prefill = steps[prefill_end].t_end
    t_end = steps[-1].t_end
    generated_at_prefill_end = sum(steps[prefill_end].tokens.values())
    total_generated = sum(steps[-1].tokens.values())
    decode_tokens = total_generated - generated_at_prefill_end
    decode_s = t_end - t_prefill
    prefill_s = t_prefill - t_start
    total_s = t_end - t_start
    ttft = sorted(t - t_start for t in first_token.values())
    return {
        "context": prompt_len, "batch": batch, "output_tokens": output_tokens,
        "prefill_s": prefill_s, "decode_s": decode_s, "total_s": total_s,
        "prefill_tok_s": batch * prompt_len / prefill_s,
        "decode_tok_s": decode_tokens / decode_s if decode_tokens and decode_s > 0 else None,
        "e2e_tok_s": (batch * prompt_len + total_generated) / total_s,
        "decode_steps": len(steps) - 1 - prefill_end,
        # per-token latency while decoding: one step serves every request in the batch
        "tpot_ms": 1e3 * decode_s / (len(steps) - 1 - prefill_end)
        if len(steps) - 1 > prefill_end else None,
        "ttft_mean_s": sum(ttft) / len(ttft),
        "generated_tokens": total_generated,
    }
