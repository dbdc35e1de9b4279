"""Which YaRN scale s serves a sequence, and what s means for its RoPE.

One policy per model, built from its YarnConfig (the only reader of YaRN
settings) and its rotary shape. The modes differ only in how s is chosen:

  static   s = factor, for every token of every request;
  dynamic  s = max(1, l / L) for a sequence of current length l (paper Eq. 24),
           optionally led by a headroom c (yarn_math.dynamic_factor) and rounded up
           to a scale step. While a prompt of P tokens is prefilled, in one step or
           in chunks, l is taken as P: every chunk runs at s(P), as a one-step
           prefill would, and decoding then follows the length;
  request  s chosen per request at admission: the smallest scale on offer whose
           window holds the positions the request will feed (prompt + max_tokens - 1,
           or prompt + reserve when max_tokens is open), unless the request names its
           own `yarn_factor`; a request that outgrows its window escalates to the next
           scale on offer (escalation_factor), recomputed by the engine's scheduler.

What s means is the same in every mode: NTK-by-parts frequencies (Eq. 17-19)
and the magnitude mscale(s) of Eq. 22 on q and k. In the per-sequence modes
s = 1 is RoPE exactly as trained (plain frequencies, mscale 1).
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field

import numpy as np
import torch

from yarn_vllm.yarn import yarn_math
from yarn_vllm.yarn.config import YarnConfig
from yarn_vllm.yarn.hf_config import head_and_rotary_dim, rope_theta_of
from yarn_vllm.errors import UserError

# The per-request override: SamplingParams.extra_args / the server's vllm_xargs key.
REQUEST_FACTOR_KEY = "yarn_factor"


@dataclass(frozen=True)
class ScalePolicy:
    """A model's YaRN scale rule. `config` is resolved (factor and original_max_position set)."""

    config: YarnConfig
    rotary_dim: int
    rope_theta: float
    # per_sequence's latest call: its scales, result and inv_freq row per scale. Every decode
    # step at unchanged scales (all of them while l <= L) reuses them: the metadata build
    # runs between layers that stream the KV cache through L2, so each torch op it skips
    # saves tens of microseconds there
    _latest: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    @classmethod
    def from_hf_config(cls, hf_config) -> "ScalePolicy | None":
        """The policy of a model whose config asks for YaRN; None for any other RoPE.

        Raises UserError, naming the field, for a YaRN config that makes no sense.
        """
        config = YarnConfig.of_model(hf_config)
        if config is None:
            return None
        _, rotary_dim = head_and_rotary_dim(hf_config)
        return cls(config.resolve(hf_config), rotary_dim, rope_theta_of(hf_config))

    @classmethod
    def from_vllm_config(cls, vllm_config) -> "ScalePolicy | None":
        model_config = getattr(vllm_config, "model_config", None)
        hf_config = getattr(model_config, "hf_config", None)
        return None if hf_config is None else cls.from_hf_config(hf_config)

    @property
    def mode(self) -> str:
        return self.config.mode

    @property
    def factor(self) -> float:
        return self.config.factor

    @property
    def original_max_position(self) -> int:
        return self.config.original_max_position

    # ---- choosing s ---------------------------------------------------------

    def dynamic_factor(self, seq_len):
        """Dynamic mode's s(l) for an int length or an integer tensor of lengths.

        With a scale step the exact s is rounded up to a multiple of it (1 stays 1), which
        keeps s non-decreasing in l: what makes prefix caching by prefill scale exact.
        """
        s = yarn_math.dynamic_factor(seq_len, self.original_max_position,
                                     self.config.dynamic_headroom, self.factor)
        step = self.config.dynamic_scale_step
        if step is None:
            return s
        if isinstance(s, torch.Tensor):
            return torch.ceil(s / step) * step
        return math.ceil(s / step) * step

    def prefill_factor(self, prompt_tokens: int) -> float:
        """Dynamic mode's s for every chunk of a prompt's prefill: s(P)."""
        return self.dynamic_factor(int(prompt_tokens))

    def scales_on_offer(self) -> tuple[float, ...]:
        """Request mode's listed scales, ascending, from 1 (or more) up to factor."""
        return self.config.scales_on_offer()

    def admission_factor(self, prompt_tokens: int, max_tokens: int | None,
                         override=None) -> float:
        """Request mode's s for a request as it enters the engine.

        The forward that produces the token at sequence index p feeds positions up to
        p - 1 and runs at the smallest listed s with s x L >= p. So a request with
        max_tokens M, whose last fed position is P + M - 2, gets the smallest s with
        s x L >= P + M - 1; an open-ended one (max_tokens None) gets room for
        `request_reserve` tokens, s x L >= P + reserve. `override` is the request's own
        `yarn_factor` (any finite 1 <= x <= factor), taken as it is.
        """
        if override is not None:
            return self.check_request_factor(override)
        if max_tokens is None:
            need = int(prompt_tokens) + self.config.request_reserve
        else:
            need = int(prompt_tokens) + max(int(max_tokens), 1) - 1
        return self._smallest_covering(need, above=0.0) or self.scales_on_offer()[-1]

    def escalation_factor(self, s: float, num_tokens: int) -> float | None:
        """Request mode: the scale a request at s moves to before the forward that produces
        its token at index `num_tokens`, or None while s's window holds that forward.

        The next listed scale covering num_tokens + reserve, else the largest listed (which
        is `factor`, whose window max_model_len bounds); None too when escalation is off or
        no listed scale is larger.
        """
        if s * self.original_max_position >= num_tokens or not self.config.request_escalate:
            return None
        found = self._smallest_covering(int(num_tokens) + self.config.request_reserve, above=s)
        larger = [x for x in self.scales_on_offer() if x > s]
        return found or (larger[-1] if larger else None)

    def _smallest_covering(self, positions: int, above: float) -> float | None:
        return next((s for s in self.scales_on_offer()
                     if s > above and s * self.original_max_position >= positions), None)

    def check_request_factor(self, value) -> float:
        """A request's `yarn_factor` as a float, or a UserError naming it.

        Any real number type is accepted (numpy scalars too); booleans are not numbers here.
        """
        fix = f"give a number from 1 to {self.factor:g} (the model's YaRN factor), or omit it"
        if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
            raise UserError(REQUEST_FACTOR_KEY, f"is {value!r}, not a number", fix,
                            source="request")
        value = float(value)
        if not (math.isfinite(value) and 1.0 <= value <= self.factor):
            raise UserError(REQUEST_FACTOR_KEY, f"is {value!r}", fix, source="request")
        return value

    # ---- what s means -------------------------------------------------------

    def inv_freq(self, s: float) -> torch.Tensor:
        """[rotary_dim // 2] fp32 frequencies at scale s: NTK-by-parts (Eq. 17-19).

        In the per-sequence modes s = 1 is plain RoPE (Eq. 3-4) bit for bit, so a short
        request runs exactly as trained (the blend at s = 1 can differ by an ulp).
        """
        if s == 1.0 and self.mode != "static":
            return yarn_math.rope_inv_freq(self.rotary_dim, self.rope_theta)
        c = self.config
        return yarn_math.yarn_inv_freq(self.rotary_dim, self.rope_theta, s,
                                       self.original_max_position, c.beta_fast, c.beta_slow,
                                       c.truncate)

    def mscale(self, s: float) -> float:
        """The magnitude on q and k at scale s (Eq. 22, or the config's explicit override).

        In the per-sequence modes it is 1 at s <= 1: an explicit attention_factor is a
        static-mode setting and does not follow s, and s = 1 must run as trained.
        """
        if s <= 1.0 and self.mode != "static":
            return 1.0
        c = self.config
        return yarn_math.yarn_mscale(s, c.mscale, c.mscale_all_dim, c.attention_factor)

    def attention_scale(self, s: float) -> float:
        """mscale(s)**2, the multiplier on the attention logits."""
        return yarn_math.attention_scale(self.mscale(s))

    def per_sequence(self, seq_lens, prompt_lens=None) -> tuple[torch.Tensor, torch.Tensor]:
        """Dynamic mode, one step's B sequences: inv_freq [B, rotary_dim // 2] and
        attention_scale [B], fp32, at each sequence's s.

        seq_lens: lengths after the step's tokens; prompt_lens: each request's prompt
        length P, or None (every step a whole prefill or a decode). A sequence still
        within its prompt (l <= P: a prefill chunk) runs at s(P), later steps at s(l).
        The tensors are shared with later calls at the same scales: read them only.
        """
        lengths = [int(n) for n in seq_lens]
        if prompt_lens is not None:
            lengths = [max(n, int(p)) for n, p in zip(lengths, prompt_lens)]
        scales = tuple(self.dynamic_factor(n) for n in lengths)
        latest = self._latest
        if latest.get("scales") == scales:
            return latest["result"]
        kept = latest.get("rows", {})
        rows = {s: kept[s] if s in kept else self.inv_freq(s) for s in dict.fromkeys(scales)}
        inv = (torch.stack([rows[s] for s in scales]) if scales
               else torch.empty(0, self.rotary_dim // 2))
        result = inv, torch.tensor([self.attention_scale(s) for s in scales], dtype=torch.float32)
        latest.update(scales=scales, rows=rows, result=result)
        return result
