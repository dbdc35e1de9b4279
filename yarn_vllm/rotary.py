"""Our replacement for vLLM's `YaRNScalingRotaryEmbedding`.

It subclasses the in-tree layer, so every isinstance check and attribute a
model expects still holds, and overrides the forwards to call the yarn_vllm
rotary op. The op computes cos/sin on the fly from `inv_freq`, so the layer
keeps O(rotary_dim) state instead of vLLM's O(max_position x rotary_dim) table;
the table is still built, lazily and from the same maths, for any vLLM code
path that reads `cos_sin_cache` directly.
"""

from __future__ import annotations

import torch
from vllm.model_executor.layers.rotary_embedding.base import RotaryEmbedding
from vllm.model_executor.layers.rotary_embedding.yarn_scaling_rope import (
    YaRNScalingRotaryEmbedding)

from yarn_vllm import yarn_math
from yarn_vllm.attention import rope_registry
from yarn_vllm.attention.rope_spec import DynamicRope
from yarn_vllm.config import validate_rotary_dim
from yarn_vllm.ops import rotary_embedding_


def _current_yarn_mode() -> tuple[str, float, int]:
    """The model's `yarn_mode` and `yarn_dynamic_headroom` (rope_parameters), and the id of
    the vLLM config that holds them."""
    from vllm.config import get_current_vllm_config

    config = get_current_vllm_config()
    hf_config = getattr(config.model_config, "hf_config", None)
    params = getattr(hf_config, "rope_parameters", None) or {}
    return (params.get("yarn_mode", "static"), float(params.get("yarn_dynamic_headroom", 1.0)),
            id(config))


class YarnRotaryEmbedding(YaRNScalingRotaryEmbedding):
    """YaRN rotary embedding (same constructor as vLLM's YaRN layer).

    `max_position_embeddings` is the original (trained) context length and
    `scaling_factor` the YaRN factor s, as vLLM's `get_rope` passes them.
    In dynamic mode the layer leaves q and k unrotated: the attention backend
    (yarn_vllm.attention.backend) rotates them with each sequence's own scale,
    and `scaling_factor` only bounds the context (max_position_embeddings).
    """

    def __init__(self, head_size: int, rotary_dim: int, max_position_embeddings: int,
                 base: float, is_neox_style: bool, scaling_factor: float, dtype: torch.dtype,
                 *, beta_fast: float = 32, beta_slow: float = 1, mscale: float | None = None,
                 mscale_all_dim: float | None = None, attention_factor: float | None = None,
                 truncate: bool = True) -> None:
        validate_rotary_dim(rotary_dim, head_size)
        mode, headroom, owner = _current_yarn_mode()
        self.dynamic = mode == "dynamic"
        self.scaling_factor = scaling_factor
        self.beta_fast = beta_fast
        self.beta_slow = beta_slow
        self.truncate = truncate
        self.mscale = yarn_math.yarn_mscale(scaling_factor, mscale, mscale_all_dim,
                                            attention_factor)
        RotaryEmbedding.__init__(self, head_size, rotary_dim, max_position_embeddings, base,
                                 is_neox_style, dtype, init_cache=False)
        self.register_buffer("inv_freq", self._compute_inv_freq(scaling_factor),
                             persistent=False)
        self._tables: dict[tuple, torch.Tensor] = {}
        if self.dynamic:
            rope_registry.publish(DynamicRope(
                head_size, rotary_dim, float(base), max_position_embeddings, is_neox_style,
                float(beta_fast), float(beta_slow), truncate, mscale, mscale_all_dim,
                attention_factor, headroom, float(scaling_factor)), owner)

    def _compute_inv_freq(self, scaling_factor: float) -> torch.Tensor:
        return yarn_math.yarn_inv_freq(self.rotary_dim, self.base, scaling_factor,
                                       self.max_position_embeddings, self.beta_fast,
                                       self.beta_slow, self.truncate)

    @property
    def attention_scale(self) -> float:
        """The multiplier this layer puts on the attention logits (mscale**2)."""
        return yarn_math.attention_scale(self.mscale)

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
        """positions: [T]; query: [T, H_q * head_size]; key: [T, H_k * head_size] or None.

        Rotates in place and returns (query, key), like vLLM's layer; in dynamic
        mode returns them untouched for the attention backend to rotate.
        """
        if self.dynamic:
            return query, key
        rotary_embedding_(positions, query, key, self.inv_freq, self.mscale, self.head_size,
                          self.is_neox_style)
        return query, key

    forward_cpu = forward_native
    forward_cuda = forward_native
    forward_hip = forward_native
    forward_xpu = forward_native
    forward_oot = forward_native

    def extra_repr(self) -> str:
        mode = "dynamic" if self.dynamic else f"factor={self.scaling_factor}, mscale={self.mscale:.4f}"
        return super().extra_repr() + f", {mode}, impl=yarn_vllm"
