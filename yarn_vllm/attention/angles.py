"""The CPU kernel's angle table: every sequence's RoPE angles, built once per engine step."""

from __future__ import annotations

import itertools

import torch

ANGLE_STRIDE = 32  # csrc/paged_attention_checks.h: kAngleStride


def table_rows(seq_len: int) -> int:
    """Rows of one frequency row's table for positions 0 .. seq_len - 1: fine, then coarse."""
    return ANGLE_STRIDE + (seq_len + ANGLE_STRIDE - 1) // ANGLE_STRIDE


def angle_table(seq_lens: list[int], inv_freq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Angles for B sequences. inv_freq: [B, rotary_dim // 2] fp32, one row per sequence.

    Per distinct frequency row: ANGLE_STRIDE "fine" rows for offsets 0..31, then a
    "coarse" row for each of positions 0, 32, 64, ...; each row is [cos | sin]. The
    kernel composes angle(t) = coarse[t // 32] * fine[t % 32]: O(l / 32) memory per
    sequence instead of a table as large as the keys. Built in float64, so it is at
    least as exact as angles formed in fp32. Returns the table [rows, rotary_dim] fp32
    and each sequence's first row [B] int64 (sequences at one scale share rows).
    """
    rotary_dim = 2 * inv_freq.shape[-1]
    keys = [inv_freq[b].numpy().tobytes() for b in range(len(seq_lens))]
    longest: dict[bytes, int] = {}
    for k, n in zip(keys, seq_lens):
        longest[k] = max(longest.get(k, 0), int(n))
    blocks: list[torch.Tensor] = []
    first_row: dict[bytes, int] = {}
    offset = 0
    for b, k in enumerate(keys):
        if k in first_row:
            continue
        freq = inv_freq[b].to(torch.float64)
        coarse = torch.arange(0, longest[k], ANGLE_STRIDE, dtype=torch.float64)
        fine = torch.arange(ANGLE_STRIDE, dtype=torch.float64)
        angles = torch.outer(torch.cat((fine, coarse)), freq)
        blocks.append(torch.cat((angles.cos(), angles.sin()), dim=-1).to(torch.float32))
        first_row[k] = offset
        offset += blocks[-1].shape[0]
    table = torch.cat(blocks) if blocks else torch.empty(0, rotary_dim)
    return table.contiguous(), torch.tensor([first_row[k] for k in keys], dtype=torch.int64)


class AngleTables:
    """`angle_table` for one step after another, keeping each scale's rows between steps.

    A frequency row's table rows are a pure function of that row and the positions, so
    a decode step at an unchanged scale (every step while l <= L) reuses the last step's
    rows, rebuilt with room to double when a sequence outgrows them. Rows of scales the
    latest step did not use are dropped: under dynamic scaling past L every step brings
    new scales, and those are built exactly as angle_table builds them.
    """

    def __init__(self) -> None:
        self._rows: dict[bytes, torch.Tensor] = {}  # frequency row -> its table rows
        # the latest call's inv_freq, positions every kept row covers, and result: a decode
        # step at unchanged scales passes the very same inv_freq (ScalePolicy.per_sequence
        # shares it), and then needs no key of its rows
        self._latest: tuple = (None, 0, None)

    def __call__(self, seq_lens: list[int], inv_freq: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        """As angle_table(seq_lens, inv_freq); the table may hold rows past the longest."""
        if not seq_lens:
            return angle_table(seq_lens, inv_freq)
        last_freq, covered, result = self._latest
        if inv_freq is last_freq and max(seq_lens) <= covered:
            return result
        keys = [inv_freq[b].numpy().tobytes() for b in range(len(seq_lens))]
        first: dict[bytes, int] = {}
        longest: dict[bytes, int] = {}
        for b, (k, n) in enumerate(zip(keys, seq_lens)):
            first.setdefault(k, b)
            longest[k] = max(longest.get(k, 0), int(n))
        kept: dict[bytes, torch.Tensor] = {}
        for k, n in longest.items():
            rows = self._rows.get(k)
            if rows is None or rows.shape[0] < table_rows(n):
                length = n if rows is None else 2 * n
                rows = angle_table([length], inv_freq[first[k]:first[k] + 1])[0]
            kept[k] = rows
        self._rows = kept
        if len(kept) == 1:
            result = rows, torch.zeros(len(keys), dtype=torch.int64)
        else:
            starts = dict(zip(kept, itertools.accumulate((r.shape[0] for r in kept.values()),
                                                         initial=0)))
            result = (torch.cat(list(kept.values())),
                      torch.tensor([starts[k] for k in keys], dtype=torch.int64))
        covered = min(r.shape[0] for r in kept.values()) - ANGLE_STRIDE
        self._latest = (inv_freq, covered * ANGLE_STRIDE, result)
        return result
