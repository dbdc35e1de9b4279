"""Perplexity against context length through vLLM prompt logprobs (YaRN paper Tables 1-2).

Windows of W tokens start every S tokens (the stride). Each window scores
only the tokens the previous window did not, so with S < W every scored
token sees at least W - S tokens of context, and with S = W windows are
disjoint. Per-position buckets show where in the window the loss comes from.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class Window:
    begin: int        # first token of the window in the text
    end: int          # one past the last
    score_from: int   # first position (in the text) whose loss this window counts


def sliding_windows(n_tokens: int, window: int, stride: int, max_windows: int | None = None
                    ) -> list[Window]:
    """Windows over a text of n_tokens tokens. The first scores from its 2nd token."""
    if window < 2 or stride < 1 or stride > window:
        raise ValueError(f"need window >= 2 and 1 <= stride <= window, got {window}, {stride}")
    if n_tokens < window:
        raise ValueError(f"the text has {n_tokens} tokens, fewer than the window ({window}); "
                         "use a longer text or a smaller window")
    out, scored_to = [], 1
    for begin in range(0, n_tokens - window + 1, stride):
        end = begin + window
        out.append(Window(begin, end, max(scored_to, begin + 1)))
        scored_to = end
        if max_windows and len(out) >= max_windows:
            break
    return out


def token_nll(prompt_logprobs: list, token_ids: list[int]) -> list[float]:
    """-log p(token_i | tokens_<i) for i >= 1, from vLLM's prompt_logprobs (index 0 is None)."""
    return [-step[str(tok)] for step, tok in zip(prompt_logprobs[1:], token_ids[1:])]


def aggregate(windows: list[Window], nll_per_window: list[list[float]],
              bucket_edges: list[int]) -> dict:
    """Perplexity overall and per in-window position bucket [edge_k, edge_k+1)."""
    total, count = 0.0, 0
    buckets = [[0.0, 0] for _ in range(len(bucket_edges) - 1)]
    for w, nll in zip(windows, nll_per_window):
        for offset, value in enumerate(nll, start=1):  # nll[0] is position 1 of the window
            if w.begin + offset < w.score_from:
                continue
            total += value
            count += 1
            for b in range(len(buckets)):
                if bucket_edges[b] <= offset < bucket_edges[b + 1]:
                    buckets[b][0] += value
                    buckets[b][1] += 1
    return {"ppl": math.exp(total / count), "tokens_scored": count,
            "buckets": [{"from": bucket_edges[b], "to": bucket_edges[b + 1],
                         "ppl": math.exp(s / n) if n else None, "tokens": n}
                        for b, (s, n) in enumerate(buckets)]}


def default_bucket_edges(window: int) -> list[int]:
    """Powers of two from 1k up to the window: [0, 1024, 2048, ..., window]."""
    edges, e = [0], 1024
    while e < window:
        edges.append(e)
        e *= 2
    return edges + [window]
