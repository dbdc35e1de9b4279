"""RoPE context-extension methods compared by the evaluations, as vLLM hf_overrides.

Each method is expressed through keys that both vLLM and HF transformers
understand, so the same setting runs in either:
  trained   the model as trained (only the length limit lifted)
  pi        Position Interpolation (Chen et al. 2023): rope_type "linear"
  ntk       NTK-aware scaling: plain RoPE with base b * s^(d / (d - 2))
            (bloc97, 2023; YaRN paper Eq. 15)
  yarn      YaRN, static (one factor for every request)
  yarn-dynamic  YaRN, dynamic: each sequence at s = max(1, len / L) in every
            step (yarn_vllm.attention); `factor` only bounds the context
  yarn-dynamic-h2  dynamic with headroom 2: s = max(1, min(2 len / L, max(factor, len / L))),
            the scale a static model would pick for twice the length, so a
            prompt is never served at the very edge of its interpolated range

A method is one entry of METHODS: a label for tables and a function
(hf_config, factor) -> hf_overrides. The evaluations, the CLI and the
results suite all read this registry.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from yarn_vllm.config import YarnConfig, head_and_rotary_dim, rope_theta_of


@dataclass(frozen=True)
class Method:
    label: str                                     # e.g. "pi (linear interpolation)"
    overrides: Callable[[dict, float], dict]       # (hf_config, factor) -> hf_overrides


def _extended(hf_config: dict, factor: float) -> int:
    return int(int(hf_config["max_position_embeddings"]) * factor)


def _trained(hf_config: dict, factor: float) -> dict:
    # RoPE unchanged; only the length limit is lifted so that the long
    # windows run at all and show what extrapolation does.
    return {"max_position_embeddings": _extended(hf_config, factor)}


def _pi(hf_config: dict, factor: float) -> dict:
    return {"max_position_embeddings": _extended(hf_config, factor),
            "rope_parameters": {"rope_type": "linear", "factor": float(factor),
                                "rope_theta": rope_theta_of(hf_config)}}


def _ntk(hf_config: dict, factor: float) -> dict:
    _, d = head_and_rotary_dim(hf_config)
    return {"max_position_embeddings": _extended(hf_config, factor),
            "rope_parameters": {"rope_type": "default",
                                "rope_theta": rope_theta_of(hf_config) * factor ** (d / (d - 2))}}


def _yarn(hf_config: dict, factor: float, mode: str = "static", headroom: float = 1.0) -> dict:
    return YarnConfig(factor=factor, mode=mode, dynamic_headroom=headroom).hf_overrides(hf_config)


METHODS: dict[str, Method] = {
    "trained": Method("trained (RoPE as trained)", _trained),
    "pi": Method("pi (linear interpolation)", _pi),
    "ntk": Method("ntk (NTK-aware, base·s^(d/(d−2)))", _ntk),
    "yarn": Method("yarn (static)", _yarn),
    "yarn-dynamic": Method("yarn-dynamic (s follows length)",
                           lambda hf, s: _yarn(hf, s, mode="dynamic")),
    "yarn-dynamic-h2": Method("yarn-dynamic-h2 (s leads length 2x, up to factor)",
                              lambda hf, s: _yarn(hf, s, mode="dynamic", headroom=2.0)),
}


def method_overrides(method: str, hf_config: dict, factor: float) -> dict:
    """hf_overrides that make vLLM serve `hf_config` with `method` at extension `factor`."""
    if method not in METHODS:
        raise ValueError(f"method {method!r} is unknown; choose from {', '.join(METHODS)}")
    return METHODS[method].overrides(hf_config, factor)
