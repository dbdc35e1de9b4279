"""What a model's HF config says about its RoPE: parameters, theta, head and rotary sizes.

Plain readers over an HF config object or a dict, whichever spelling it uses
(`rope_parameters`, transformers >= 5, or the legacy `rope_scaling`). The YaRN
settings themselves are read by YarnConfig (yarn_vllm.yarn.config), which builds on these.
"""

from __future__ import annotations

from typing import Mapping

from yarn_vllm.errors import UserError

# Keys of rope_parameters that name the RoPE variant; "type" is the legacy rope_scaling spelling.
_ROPE_TYPE_KEYS = ("rope_type", "type")


def rope_parameters_of(hf_config) -> dict:
    """The RoPE parameters of an HF config object or dict, whichever spelling it uses."""
    get = hf_config.get if isinstance(hf_config, Mapping) else (
        lambda k, d=None: getattr(hf_config, k, d))
    params = dict(get("rope_parameters", None) or get("rope_scaling", None) or {})
    if "rope_theta" not in params and get("rope_theta", None) is not None:
        params["rope_theta"] = get("rope_theta")
    if "partial_rotary_factor" not in params and get("partial_rotary_factor", None) is not None:
        params["partial_rotary_factor"] = get("partial_rotary_factor")
    return params


def rope_theta_of(hf_config) -> float:
    theta = rope_parameters_of(hf_config).get("rope_theta")
    if theta is None:
        raise UserError("rope_theta", "is missing: the model does not use RoPE",
                              "YaRN only applies to RoPE models (Llama, Qwen, Mistral, ...)")
    return float(theta)


def rope_type_of(params: dict):
    for key in _ROPE_TYPE_KEYS:
        if params.get(key) is not None:
            return params[key]
    return None


def config_value(hf_config, key):
    if isinstance(hf_config, Mapping):
        return hf_config.get(key)
    return getattr(hf_config, key, None)


def head_and_rotary_dim(hf_config) -> tuple[int, int]:
    """(head_size, rotary_dim) of a model config; raises if the model has no RoPE."""
    rope_theta_of(hf_config)
    head_size = config_value(hf_config, "head_dim")
    if head_size is None:
        hidden, heads = config_value(hf_config, "hidden_size"), config_value(hf_config, "num_attention_heads")
        if not hidden or not heads:
            raise UserError("head_dim", "cannot be derived from the model config",
                                  "the config needs head_dim or hidden_size and num_attention_heads")
        head_size = hidden // heads
    partial = rope_parameters_of(hf_config).get("partial_rotary_factor", 1.0)
    return int(head_size), int(head_size * partial)


def check_rotary_dims(hf_config) -> None:
    head_size, rotary_dim = head_and_rotary_dim(hf_config)
    validate_rotary_dim(rotary_dim, head_size)


def validate_rotary_dim(rotary_dim: int, head_size: int) -> None:
    if rotary_dim % 2:
        raise UserError("rotary_dim", f"is {rotary_dim}, which is odd",
                              "RoPE rotates channel pairs; use an even rotary_dim "
                              "(partial_rotary_factor x head_dim)")
    if rotary_dim > head_size or rotary_dim <= 0:
        raise UserError("rotary_dim", f"is {rotary_dim} for head_size {head_size}",
                              "use 0 < rotary_dim <= head_size (partial_rotary_factor <= 1)")
