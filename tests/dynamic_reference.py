"""Plain-PyTorch Dynamic-YaRN generation for a Llama: the paper's semantics, written directly.

It keeps a cache of keys *before* RoPE. Each step it takes the scale
s = max(1, l / L) from the length l after the step's tokens (paper Section 3.3,
Eq. 24), re-rotates every cached key and the step's queries with the YaRN
frequencies at s (Eq. 17-19, written out in `PaperDynamicYarn.inv_freq`, float64; plain
RoPE, Eq. 3-4, at s = 1) and scales the logits by mscale(s)^2 (Eq. 22). The prompt is one step.
Weights come from an HF LlamaForCausalLM; only its linear layers, norms and MLPs
are used.

Nothing here reads yarn_vllm (neither ScalePolicy nor yarn_math): the scale rule, the
frequencies and the magnitude are written out below, so that a test comparing the engine with this loop compares
two implementations, not one with itself.

Preemption. vLLM preempts by recomputation: a preempted sequence loses its
cache, and when it is scheduled again its prompt and every token generated so
far are prefilled in one step, like a fresh prompt of that length. In dynamic
mode that prefill runs at the scale of the whole length l = P + k (P prompt
tokens, k generated), so the recomputed keys and values of layers >= 1 are those
of one forward at s(P + k), not the ones the sequence had built step by step.
`generate(..., recompute_at={k})` does exactly that before it produces token k.
"""

from __future__ import annotations

import dataclasses
import math

import torch


# An fp32 engine against this loop, on the logprob of each token the engine chose. This loop
# forms RoPE angles in float64; the engine's SDPA path (prefills) forms them in fp32, as HF
# and vLLM do, half an ulp of position x frequency off (6e-5 rad at position 1024), while
# its kernel path reads a table exact to ~1e-6. Measured on the tiny Llama: at most 9.3e-5
# (a 1,057-token recompute), 2e-5 on decode-only steps; with fp32 angles on the prefill
# steps only, this loop meets the engine within 1.6e-5 everywhere.
LOGPROB_TOL = 2e-4
# What a wrong scale must be off by, at least, for a test at LOGPROB_TOL to mean anything.
CONTRAST = 100 * LOGPROB_TOL
TIE = 1e-3  # two tokens this close are a tie that summation order may break either way
# Dynamic mode has no list of scales; a test's neighbouring scales are those of a length one
# 32-token block away at L = 1024: s +- 1/32 (s - 1/32 only where it stays >= 1).
NEIGHBOUR = 1 / 32


@dataclasses.dataclass(frozen=True)
class PaperDynamicYarn:
    """Dynamic YaRN for one model: the rotary shape and the YaRN settings, paper names.

    `fixed_scale`, when set, replaces s(l) by that s at every step: 1.0 is the model as
    trained, the configured factor is static YaRN; `scale_offset` moves s(l) by that much
    (kept >= 1): NEIGHBOUR is the neighbouring scale (the contrasts a test needs).
    """

    rotary_dim: int
    rope_theta: float
    original_max_position: int
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    truncate: bool = True
    mscale: float | None = None
    mscale_all_dim: float | None = None
    attention_factor: float | None = None
    fixed_scale: float | None = None
    scale_offset: float = 0.0

    def scale(self, length: int) -> float:
        """s = max(1, l / L) (Eq. 24)."""
        if self.fixed_scale is not None:
            return self.fixed_scale
        return max(1.0, max(1.0, length / self.original_max_position) + self.scale_offset)

    def inv_freq(self, s: float) -> torch.Tensor:
        """[rotary_dim // 2] float64: plain RoPE at s = 1, NTK-by-parts (Eq. 17-19) above.

        Written out here, not taken from yarn_vllm. theta_j = b^(-2j/d) (Eq. 3-4); the
        wavelength lambda_j = 2 pi / theta_j (Eq. 13) fits r_j = L / lambda_j times into L
        (Eq. 16). The ramp gamma (Eq. 18) is 1 (keep theta_j) where r_j > beta_fast and 0
        (theta_j / s) where r_j < beta_slow; in between it runs linearly over the index j,
        as the paper's released code and every checkpoint do, from the j where
        r_j = beta_fast to the j where r_j = beta_slow: j(r) = d ln(L / (2 pi r)) / (2 ln b).
        `truncate` rounds those two bounds outwards to whole indices.
        """
        d, b, L = self.rotary_dim, self.rope_theta, self.original_max_position
        j = torch.arange(d // 2, dtype=torch.float64)
        theta = b ** (-2.0 * j / d)
        if s == 1.0:
            return theta

        def index_of(rotations: float) -> float:
            return d * math.log(L / (2 * math.pi * rotations)) / (2 * math.log(b))

        low, high = index_of(self.beta_fast), index_of(self.beta_slow)
        if self.truncate:
            low, high = math.floor(low), math.ceil(high)
        low, high = max(low, 0), min(high, d - 1)
        if high == low:  # a step at `low`, as the released code widens it
            high += 1e-3
        gamma = 1.0 - ((j - low) / (high - low)).clamp(0.0, 1.0)  # Eq. 18, over the index
        return theta / s * (1.0 - gamma) + theta * gamma  # Eq. 19

    def attention_scale(self, s: float) -> float:
        """The logit multiplier mscale(s)^2.

        sqrt(1/t) = 0.1 ln s + 1 (Eq. 22); with DeepSeek's `mscale` and `mscale_all_dim`
        both set, the ratio (0.1 m ln s + 1) / (0.1 m_all ln s + 1); an explicit
        `attention_factor` replaces either. At s = 1 the model runs as trained: 1, whatever
        the config says (an attention_factor describes the extended model only).
        """
        if s == 1.0:
            return 1.0
        if self.attention_factor is not None:
            m = self.attention_factor
        elif self.mscale and self.mscale_all_dim:
            ln_s = math.log(s)
            m = (0.1 * self.mscale * ln_s + 1) / (0.1 * self.mscale_all_dim * ln_s + 1)
        else:
            m = 0.1 * math.log(s) + 1
        return m * m


def _cos_sin(length: int, inv_freq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin [length, 1, rotary_dim // 2] of positions 0..length-1, formed in float64."""
    angles = torch.arange(length, dtype=torch.float64)[:, None] * inv_freq.double()[None, :]
    return angles.cos().float()[:, None], angles.sin().float()[:, None]


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """NeoX-style RoPE (full rotary) of x [T, H, D] with cos, sin [T, 1, D // 2]."""
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2:]
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


def _attention(q, k, v, cos, sin, attention_scale: float, head_size: int):
    """q: [t, Hq, D], the last t of the l positions; k, v: [l, Hkv, D] pre-RoPE; cos, sin
    [l, 1, D // 2]. Returns [t, Hq * D] (fp32)."""
    t, l = q.shape[0], k.shape[0]
    q, k = _rotate(q, cos[l - t:], sin[l - t:]), _rotate(k, cos, sin)
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    logits = torch.einsum("qhd,khd->hqk", q, k) * (head_size ** -0.5 * attention_scale)
    causal = torch.arange(l)[None, :] > torch.arange(l - t, l)[:, None]
    logits.masked_fill_(causal[None], float("-inf"))
    return torch.einsum("hqk,khd->qhd", logits.softmax(-1), v).reshape(t, -1)


def _empty_cache(model) -> tuple[list, list]:
    """Per layer, no keys and no values yet ([0, kv heads, head_dim] each)."""
    cfg = model.config
    empty = torch.empty(0, cfg.num_key_value_heads, cfg.head_dim)
    n = len(model.model.layers)
    return [empty] * n, [empty] * n


def _step(model, ids: torch.Tensor, keys: list, values: list, length: int,
          rope: PaperDynamicYarn, s: float) -> torch.Tensor:
    """One forward of the tokens `ids`, the last of `length` positions, at scale s: appends
    their pre-RoPE keys and values to each layer's `keys` and `values` (in place) and returns
    the log-softmax [vocab] after the last of them."""
    cfg = model.config
    head = cfg.head_dim
    cos, sin = _cos_sin(length, rope.inv_freq(s))
    x = model.model.embed_tokens(ids).float()
    for i, layer in enumerate(model.model.layers):
        attn = layer.self_attn
        h = layer.input_layernorm(x)
        q = attn.q_proj(h).view(-1, cfg.num_attention_heads, head)
        keys[i] = torch.cat((keys[i], attn.k_proj(h).view(-1, cfg.num_key_value_heads, head)))
        values[i] = torch.cat((values[i], attn.v_proj(h).view(-1, cfg.num_key_value_heads, head)))
        x = x + attn.o_proj(_attention(q, keys[i], values[i], cos, sin,
                                       rope.attention_scale(s), head))
        x = x + layer.mlp(layer.post_attention_layernorm(x))
    return torch.log_softmax(model.lm_head(model.model.norm(x[-1:]))[0].float(), -1)


@torch.no_grad()
def generate(model, prompt: list[int], new_tokens: int, rope: PaperDynamicYarn,
             recompute_at=(), forced: list[int] | None = None
             ) -> tuple[list[int], list[torch.Tensor]]:
    """Greedy tokens and the log-softmax of every step ([vocab] each; the first is the prompt's).

    recompute_at: the k (tokens generated so far) before which the cache is dropped and
    the whole sequence prefilled again in one step, as vLLM resumes a preempted sequence.
    forced: tokens to feed instead of the greedy ones (to follow an engine's continuation).
    """
    keys, values = _empty_cache(model)
    tokens, logprobs = list(prompt), []
    step_ids = torch.tensor(prompt)
    for k in range(new_tokens):
        if k in recompute_at:
            keys, values = _empty_cache(model)
            step_ids = torch.tensor(tokens)
        length = len(tokens)
        lp = _step(model, step_ids, keys, values, length, rope, rope.scale(length))
        logprobs.append(lp)
        token = int(lp.argmax()) if forced is None else forced[k]
        tokens.append(token)
        step_ids = torch.tensor([token])
    return tokens[len(prompt):], logprobs


@torch.no_grad()
def replay(model, prompt: list[int], tokens: list[int], spans: list[tuple[int, int]],
           rope: PaperDynamicYarn, chunk_scale=None) -> list[torch.Tensor]:
    """One request's steps as an engine ran them: the log-softmax [vocab] of each step that
    sampled a token (the first is the prompt's), following the engine's `tokens`.

    spans: per step the request was scheduled in, the positions [start, stop) it computed.
    Positions before `start` keep the keys and values computed earlier, by whichever step
    computed them (a prefix-cache hit, or the rest of a chunked prefill); a `start` below
    what was computed is a recompute after preemption: the rest is dropped and computed
    again. A step computes its positions at the scale of the length it reaches,
    s(stop), except a chunk still inside the prompt (stop <= P), which runs at s(P), as
    a one-step prefill would (docs/modes.md); `chunk_scale(stop, P)` replaces that rule
    (contrasts). A step reaching the end of what is known (stop = P + tokens so far)
    samples the next token.
    """
    P, sequence = len(prompt), list(prompt) + list(tokens)
    keys, values = _empty_cache(model)
    scale_of = chunk_scale or (lambda stop, p: rope.scale(p if stop <= p else stop))
    logprobs = []
    for start, stop in spans:
        assert keys[0].shape[0] >= start, f"positions {keys[0].shape[0]}..{start} never computed"
        keys, values = [k[:start] for k in keys], [v[:start] for v in values]
        lp = _step(model, torch.tensor(sequence[start:stop]), keys, values, stop, rope,
                   scale_of(stop, P))
        if stop == P + len(logprobs):
            logprobs.append(lp)
    return logprobs


def rope_of(hf_config: dict, original_max_position: int | None = None) -> PaperDynamicYarn:
    """The paper's Dynamic YaRN for a Llama config dict (NeoX pairs, full rotary).

    YaRN settings (betas, truncate, mscale, mscale_all_dim, attention_factor) come from its
    rope_parameters when it has them; `original_max_position` defaults to theirs.
    """
    head = hf_config.get("head_dim") or hf_config["hidden_size"] // hf_config["num_attention_heads"]
    params = hf_config.get("rope_parameters") or {}
    theta = hf_config.get("rope_theta") or params.get("rope_theta")
    original = original_max_position or params["original_max_position_embeddings"]
    return PaperDynamicYarn(head, float(theta), int(original),
                            beta_fast=params.get("beta_fast") or 32.0,
                            beta_slow=params.get("beta_slow") or 1.0,
                            truncate=params.get("truncate", True),
                            mscale=params.get("mscale"),
                            mscale_all_dim=params.get("mscale_all_dim"),
                            attention_factor=params.get("attention_factor"))


def logprob_gap(ours: dict, logprobs: list[torch.Tensor]) -> float:
    """The largest |engine - reference| over the logprobs of the engine's own tokens.

    ours: an engine output ({"token_ids", "logprobs": [{str(token): logprob}]});
    logprobs: the reference's [vocab] log-softmax per step (all steps, or the first few).
    """
    return max(abs(ours["logprobs"][step][str(token)] - lp[token].item())
               for step, (token, lp) in enumerate(zip(ours["token_ids"], logprobs)))


def assert_follows(ours: dict, logprobs) -> None:
    """Every step, near-ties included: the engine's every token is the reference's greedy
    choice (or tied with it within TIE), at a logprob within LOGPROB_TOL. The reference ran along
    the engine's tokens (teacher forcing), so a tie the engine broke the other way does not
    end the comparison: the next steps are compared on the engine's own continuation.
    logprobs: the reference's log-softmax per step, [vocab] each (a list or a [steps, vocab]
    tensor)."""
    assert len(logprobs) == len(ours["token_ids"])
    for step, (token, lp) in enumerate(zip(ours["token_ids"], logprobs)):
        assert lp.max().item() - lp[token].item() < TIE, f"step {step}: not the greedy token"
    gap = logprob_gap(ours, logprobs)
    assert gap <= LOGPROB_TOL, f"logprobs differ by {gap:.3g}"
