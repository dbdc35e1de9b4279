"""Our replacement for vLLM's `YaRNScalingRotaryEmbedding`, in each of the three modes.

It subclasses the in-tree layer, so every isinstance check and attribute a
model expects still holds, and overrides the forwards to call the yarn_vllm
rotary op, which forms cos/sin on the fly from fp32 frequency rows: O(rotary_dim)
state per scale instead of vLLM's O(max_position x rotary_dim) table (the table
is still built, lazily and from the same maths, for vLLM code that reads
`cos_sin_cache`). The model's `rope_parameters.yarn_mode` picks the mode:

  static   one frequency row (s = factor) for every token;
  request  one row per scale in use; `scale_index[t]` picks token t's row. The
           model runner writes it before each forward (yarn_vllm.vllm_seam.step),
           so the forward itself has no host sync and is CUDA-graph safe;
  dynamic  q and k pass through unrotated; the attention backend rotates them
           per sequence (yarn_vllm.attention).
"""

from __future__ import annotations

import torch
from vllm.model_executor.layers.rotary_embedding.base import RotaryEmbedding
from vllm.model_executor.layers.rotary_embedding.yarn_scaling_rope import (
    YaRNScalingRotaryEmbedding)

from yarn_vllm.yarn.config import YarnConfig
from yarn_vllm.yarn.hf_config import validate_rotary_dim
from yarn_vllm.errors import UserError
from yarn_vllm.ops import rotary_embedding_
from yarn_vllm.yarn.scale_policy import ScalePolicy

# Buffers that stay fp32 whatever dtype the model is cast to: the op reads fp32 rows,
# and a round trip through bf16 would silently keep bf16 precision.
_FP32_BUFFERS = ("inv_freq", "mscales")


def _served_config() -> tuple[YarnConfig | None, object]:
    """The YaRN settings of the model vLLM is building (None outside an engine), and its config."""
    from vllm.config import get_current_vllm_config

    vllm_config = get_current_vllm_config()
    hf_config = getattr(getattr(vllm_config, "model_config", None), "hf_config", None)
    return (None if hf_config is None else YarnConfig.of_model(hf_config)), vllm_config


def _check_matches_model(layer: ScalePolicy, vllm_config, is_neox_style: bool) -> None:
    """The per-sequence modes read one policy per model (the attention backend and the
    admission build theirs from the model config): a layer built from other settings
    (the request and dynamic knobs aside, which only the model config carries) is refused."""
    model = ScalePolicy.from_vllm_config(vllm_config)
    fields = ("factor", "original_max_position", "beta_fast", "beta_slow", "truncate", "mscale",
              "mscale_all_dim", "attention_factor")
    ours = [getattr(layer.config, f) for f in fields] + [layer.rotary_dim, layer.rope_theta]
    theirs = [getattr(model.config, f) for f in fields] + [model.rotary_dim, model.rope_theta]
    fix = "serve this model with yarn_mode 'static'"
    if ours != theirs:
        differ = [f"{f} {a} vs {b}" for f, a, b in zip(fields + ("rotary_dim", "rope_theta"),
                                                        ours, theirs) if a != b]
        raise UserError("rope_parameters", f"of a rotary layer differ from the model's in "
                        f"yarn_mode {model.mode!r} ({', '.join(differ)})", fix)
    if model.mode == "dynamic" and not is_neox_style:
        raise UserError("is_neox_style", "is False; dynamic mode serves NeoX-style RoPE", fix)


class YarnRotaryEmbedding(YaRNScalingRotaryEmbedding):
    """YaRN rotary embedding (same constructor as vLLM's YaRN layer).

    `max_position_embeddings` is the original (trained) context length and
    `scaling_factor` the YaRN factor s, as vLLM's `get_rope` passes them.
    Buffers: inv_freq [rows, rotary_dim / 2] and mscales [rows] (fp32), and in
    request mode scale_index [max_num_batched_tokens] (int32).
    """

    def __init__(self, head_size: int, rotary_dim: int, max_position_embeddings: int,
                 base: float, is_neox_style: bool, scaling_factor: float, dtype: torch.dtype,
                 *, beta_fast: float = 32, beta_slow: float = 1, mscale: float | None = None,
                 mscale_all_dim: float | None = None, attention_factor: float | None = None,
                 truncate: bool = True) -> None:
        validate_rotary_dim(rotary_dim, head_size)
        served, vllm_config = _served_config()
        mode = served.mode if served else "static"
        config = YarnConfig(
            factor=scaling_factor, original_max_position=max_position_embeddings,
            beta_fast=beta_fast, beta_slow=beta_slow, truncate=truncate, mscale=mscale,
            mscale_all_dim=mscale_all_dim, attention_factor=attention_factor, mode=mode,
            dynamic_headroom=served.dynamic_headroom if mode == "dynamic" else 1.0,
            dynamic_scale_step=served.dynamic_scale_step if mode == "dynamic" else None)
        if mode != "static":  # the model's policy, which admission and the backend read too
            _check_matches_model(ScalePolicy(config, rotary_dim, float(base)), vllm_config,
                                 is_neox_style)
            config = served.resolve(vllm_config.model_config.hf_config)
        self.policy = ScalePolicy(config, rotary_dim, float(base))
        self.yarn_mode = config.mode
        self.scaling_factor = scaling_factor
        self.beta_fast = beta_fast
        self.beta_slow = beta_slow
        self.truncate = truncate
        self.mscale = self.policy.mscale(scaling_factor)
        RotaryEmbedding.__init__(self, head_size, rotary_dim, max_position_embeddings, base,
                                 is_neox_style, dtype, init_cache=False)
        scales = (self.policy.scales_on_offer() if self.yarn_mode == "request"
                  else (float(scaling_factor),))
        rows = len(scales)
        if self.yarn_mode == "request":
            # room for every running request's own override on top of the listed scales
            rows += int(vllm_config.scheduler_config.max_num_seqs)
        inv_freq = torch.empty(rows, rotary_dim // 2, dtype=torch.float32)
        mscales = torch.empty(rows, dtype=torch.float32)
        for row in range(rows):  # override rows start as copies of the first, until used
            s = scales[row] if row < len(scales) else scales[0]
            inv_freq[row] = self.policy.inv_freq(s)
            mscales[row] = self.policy.mscale(s)
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.register_buffer("mscales", mscales, persistent=False)
        tokens = (int(vllm_config.scheduler_config.max_num_batched_tokens)
                  if self.yarn_mode == "request" else 0)
        self.register_buffer("scale_index", torch.zeros(tokens, dtype=torch.int32),
                             persistent=False)
        self._tables: dict[tuple, torch.Tensor] = {}

    def _apply(self, fn, recurse=True):
        """Device moves reach the fp32 buffers; dtype casts (.half(), .to(bf16)) do not."""
        kept = {n: self._buffers[n] for n in _FP32_BUFFERS if self._buffers.get(n) is not None}
        super()._apply(fn, recurse)
        for name, before in kept.items():
            after = self._buffers[name]
            if after.dtype != torch.float32:
                self._buffers[name] = before.to(after.device)
        return self

    @property
    def attention_scale(self) -> float:
        """The multiplier this layer puts on the attention logits in static mode (mscale**2)."""
        return self.policy.attention_scale(self.scaling_factor)

    @property
    def cos_sin_cache(self) -> torch.Tensor:
        """vLLM's [factor x original, rotary_dim] table (cos | sin, times mscale), built on demand."""
        key = (self.inv_freq.device, self.dtype)
        if key not in self._tables:
            self._tables[key] = self._compute_cos_sin_cache().to(self.inv_freq.device, self.dtype)
        return self._tables[key]

    @cos_sin_cache.setter
    def cos_sin_cache(self, table: torch.Tensor) -> None:
        self._tables[(table.device, table.dtype)] = table

    def forward_native(self, positions: torch.Tensor, query: torch.Tensor,
                       key: torch.Tensor | None = None):
        """positions: any shape of T ids; query: [..., H_q * head_size] or [..., H_q, head_size]
        with T tokens in its leading dims; key likewise with H_k, or None.

        Rotates in place and returns (query, key) in their own shapes, like vLLM's layer;
        in dynamic mode returns them untouched for the attention backend to rotate.
        """
        if self.yarn_mode == "dynamic":
            return query, key
        positions = positions.flatten()
        tokens = positions.shape[0]
        q = query.view(tokens, -1, self.head_size)
        k = None if key is None else key.view(tokens, -1, self.head_size)
        if self.yarn_mode == "request":
            if tokens > self.scale_index.shape[0]:
                raise ValueError(f"yarn_vllm: {tokens} tokens in one forward, past the "
                                 f"{self.scale_index.shape[0]} scale slots of request mode "
                                 "(max_num_batched_tokens)")
            rotary_embedding_(positions, q, k, self.inv_freq, self.mscales, self.head_size,
                              self.is_neox_style, scale_index=self.scale_index[:tokens])
        else:  # the buffers, not a float: no host-to-device copy inside a CUDA graph
            rotary_embedding_(positions, q, k, self.inv_freq, self.mscales, self.head_size,
                              self.is_neox_style)
        return query, key

    forward_cpu = forward_native
    forward_cuda = forward_native
    forward_hip = forward_native
    forward_xpu = forward_native
    forward_oot = forward_native

    def extra_repr(self) -> str:
        if self.yarn_mode == "static":
            mode = f"factor={self.scaling_factor}, mscale={self.mscale:.4f}"
        elif self.yarn_mode == "request":
            mode = f"request, scales={list(self.policy.scales_on_offer())}"
        else:
            mode = "dynamic"
        return super().extra_repr() + f", {mode}, impl=yarn_vllm"
