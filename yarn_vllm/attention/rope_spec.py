"""What the attention backend needs to know about the model's RoPE, per scale s."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from yarn_vllm import yarn_math

ANGLE_STRIDE = 32  # csrc/paged_attention_cpu_kernel.h: kAngleStride


@dataclass(frozen=True)
class DynamicRope:
    """YaRN parameters that do not depend on s; `inv_freq(s)` and `logit_multiplier(s)` do.

    `original_max_position` is the trained context L: s = max(1, len / L), or with
    `headroom` c > 1, max(1, min(c len / L, max(factor, len / L))) (yarn_math.dynamic_factor).
    """

    head_size: int
    rotary_dim: int
    base: float
    original_max_position: int
    is_neox: bool = True
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    truncate: bool = True
    mscale: float | None = None
    mscale_all_dim: float | None = None
    attention_factor: float | None = None
    headroom: float = 1.0
    factor: float = 1.0

    def scale(self, seq_len: int) -> float:
        """s(l) of the paper's Dynamic scaling (Eq. 24), led by `headroom`."""
        return yarn_math.dynamic_factor(int(seq_len), self.original_max_position,
                                        self.headroom, self.factor)

    def inv_freq(self, s: float) -> torch.Tensor:
        """[rotary_dim // 2] fp32 NTK-by-parts frequencies at scale s (Eq. 17-19)."""
        return yarn_math.yarn_inv_freq(self.rotary_dim, self.base, s, self.original_max_position,
                                       self.beta_fast, self.beta_slow, self.truncate)

    def logit_multiplier(self, s: float) -> float:
        """mscale(s)**2 (Eq. 22 squared, since q and k are both scaled); 1 at s = 1.

        An explicit attention_factor is a static-mode override and does not follow s,
        so at s = 1 the model is served exactly as trained.
        """
        if s <= 1.0:
            return 1.0
        return yarn_math.attention_scale(
            yarn_math.yarn_mscale(s, self.mscale, self.mscale_all_dim, self.attention_factor))

    def per_sequence(self, seq_lens: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """For B sequence lengths: inv_freq [B, rotary_dim // 2] and logit multiplier [B], fp32."""
        scales = [self.scale(n) for n in seq_lens]
        cache: dict[float, torch.Tensor] = {}
        rows = []
        for s in scales:
            if s not in cache:
                cache[s] = self.inv_freq(s)
            rows.append(cache[s])
        inv = torch.stack(rows) if rows else torch.empty(0, self.rotary_dim // 2)
        mult = torch.tensor([self.logit_multiplier(s) for s in scales], dtype=torch.float32)
        return inv, mult

    def angle_table(self, seq_lens: list[int], inv_freq: torch.Tensor
                    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The CPU kernel's angles of every sequence, built once per engine step.

        inv_freq: [B, rotary_dim // 2] (from `per_sequence`). Per distinct frequency
        row: ANGLE_STRIDE "fine" rows for offsets 0..31, then a "coarse" row for each
        of positions 0, 32, 64, ...; each row is [cos | sin]. The kernel composes
        angle(t) = coarse[t // 32] * fine[t % 32]. Built in float64, so it is at least
        as exact as angles formed in fp32. Returns the table [rows, rotary_dim] fp32
        and each sequence's first row [B] int64 (sequences at one scale share rows).
        """
        blocks: list[torch.Tensor] = []
        first_row: dict[bytes, int] = {}
        longest: dict[bytes, int] = {}
        keys = [inv_freq[b].numpy().tobytes() for b in range(len(seq_lens))]
        for k, n in zip(keys, seq_lens):
            longest[k] = max(longest.get(k, 0), int(n))
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
        table = torch.cat(blocks) if blocks else torch.empty(0, self.rotary_dim)
        return table.contiguous(), torch.tensor([first_row[k] for k in keys], dtype=torch.int64)
