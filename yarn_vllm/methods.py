"""RoPE context-extension methods compared by the evaluations, as vLLM hf_overrides.

Each method is expressed through keys that both vLLM and HF transformers
understand, so the same setting runs in either:
  trained   the model as trained (only the length limit lifted)
  pi        Position Interpolation (Chen et al. 2023): rope_type "linear"
  ntk       NTK-aware scaling: plain RoPE with base b * s^(d / (d - 2))
            (bloc97, 2023; YaRN paper Eq. 15)
  yarn      YaRN, static (one factor for every request)
"""

from __future__ import annotations

from yarn_vllm.config import YarnConfig, head_and_rotary_dim, rope_theta_of

# "yarn-dynamic" joins once the pre-RoPE attention backend serves yarn_mode "dynamic".
METHODS = ("trained", "pi", "ntk", "yarn")


def method_overrides(method: str, hf_config: dict, factor: float) -> dict:
    """hf_overrides that make vLLM serve `hf_config` with `method` at extension `factor`."""
    original = int(hf_config["max_position_embeddings"])
    if method == "trained":
        # RoPE unchanged; only the length limit is lifted so that the long
        # windows run at all and show what extrapolation does.
        return {"max_position_embeddings": int(original * factor)}
    if method == "yarn":
        return YarnConfig(factor=factor).hf_overrides(hf_config)
    theta = rope_theta_of(hf_config)
    if method == "pi":
        params = {"rope_type": "linear", "factor": float(factor), "rope_theta": theta}
    elif method == "ntk":
        _, rotary_dim = head_and_rotary_dim(hf_config)
        params = {"rope_type": "default",
                  "rope_theta": theta * factor ** (rotary_dim / (rotary_dim - 2))}
    else:
        raise ValueError(f"method {method!r} is unknown; choose from {', '.join(METHODS)}")
    return {"max_position_embeddings": int(original * factor), "rope_parameters": params}
