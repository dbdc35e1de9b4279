"""The RoPE methods that evaluations and benchmarks compare: one registry, as vLLM settings.

Each method is expressed through hf_overrides keys that both vLLM and HF transformers
understand, so the same setting runs in either:
  trained   the model as trained (only the length limit lifted)
  pi        Position Interpolation (Chen et al. 2023): rope_type "linear"
  ntk       NTK-aware scaling: plain RoPE with rope_theta b * s^(d / (d - 2))
            (bloc97, 2023; YaRN paper Eq. 15)
  yarn      YaRN, static (one factor for every request), our rotary layer
  yarn-dynamic  YaRN, dynamic: each sequence at s = max(1, len / L) in every
            step (yarn_vllm.attention); `factor` only bounds the context
  yarn-dynamic-h2  dynamic with headroom 2: s = max(1, min(2 len / L, max(factor, len / L))),
            the scale a static model would pick for twice the length, so a
            prompt is never served at the very edge of its interpolated range
  yarn-request  YaRN, one scale per request chosen at admission from 1, 2, 4, ...,
            factor (the smallest whose window holds the request; generation tasks
            send no max_tokens, so it gets the reserve and escalates), on vLLM's own
            attention with the keys cached rotated (yarn_vllm.vllm_seam.request_scales)
  vllm-yarn vLLM's own static YaRN layer: yarn's settings with our plugin off
            (VLLM_PLUGINS=""), the baseline the benchmarks divide by

A method is one entry of METHODS: a label for tables, a function
(hf_config, factor) -> hf_overrides, whether our plugin is loaded, and whether
`eval` and `bench offline` run it by default. The evaluations, the benchmarks,
the CLI and the results suite all read this registry; a new method is one more entry.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

from yarn_vllm.yarn.config import YarnConfig
from yarn_vllm.yarn.hf_config import head_and_rotary_dim, rope_theta_of


@dataclass(frozen=True)
class Method:
    label: str                                     # e.g. "pi (linear interpolation)"
    overrides: Callable[[dict, float], dict]       # (hf_config, factor) -> hf_overrides
    plugins: bool = True                           # False: vLLM's own layers serve
    evaluated: bool = True                         # in `eval`'s default set and the suite
    benched: bool = False                          # in `bench offline`'s default set
    # generation tasks send no max_tokens, as a chat client does (request mode admits such a
    # request with its reserve and escalates it if its answer outgrows that)
    open_ended: bool = False


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
    "trained": Method("trained (RoPE as trained)", _trained, benched=True),
    "pi": Method("pi (linear interpolation)", _pi),
    "ntk": Method("ntk (NTK-aware, base·s^(d/(d−2)))", _ntk),
    "yarn": Method("yarn (static)", _yarn, benched=True),
    "yarn-dynamic": Method("yarn-dynamic (s follows length)",
                           lambda hf, s: _yarn(hf, s, mode="dynamic"), benched=True),
    "yarn-dynamic-h2": Method("yarn-dynamic-h2 (s leads length 2x, up to factor)",
                              lambda hf, s: _yarn(hf, s, mode="dynamic", headroom=2.0)),
    "yarn-request": Method("yarn-request (s per request: 1, 2, 4, ... up to factor)",
                           lambda hf, s: _yarn(hf, s, mode="request"), benched=True,
                           open_ended=True),
    # Same quality as yarn by construction (tests/test_e2e_vllm.py); a speed baseline only.
    "vllm-yarn": Method("vllm-yarn (vLLM's own YaRN layer)", _yarn, plugins=False,
                        evaluated=False, benched=True),
}


def eval_methods() -> list[str]:
    """What `eval` and the results suite run by default, in registry order."""
    return [name for name, m in METHODS.items() if m.evaluated]


def bench_methods() -> list[str]:
    """What `bench offline` runs by default, in registry order."""
    return [name for name, m in METHODS.items() if m.benched]


def method(name: str) -> Method:
    if name not in METHODS:
        raise ValueError(f"method {name!r} is unknown; choose from {', '.join(METHODS)}")
    return METHODS[name]


def method_overrides(name: str, hf_config: dict, factor: float, max_len: int = 0) -> dict:
    """hf_overrides that make vLLM serve `hf_config` with method `name` at extension `factor`,
    with a length limit of at least `max_len` tokens (the RoPE maths does not read it)."""
    overrides = method(name).overrides(hf_config, factor)
    overrides["max_position_embeddings"] = max(overrides["max_position_embeddings"], max_len)
    return overrides


def hf_config_of(model: str) -> dict:
    """A model folder's HF config as a dict (what the overrides are built from)."""
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(model).to_dict()


def checked_factor(hf_config: dict, longest: int, factor: float | None) -> float:
    """`factor`, or the default rule (default_factor) for `longest` tokens, prompt and output.

    Checked as YarnConfig checks it (finite, >= 1, factor x trained length in bounds) for
    every method: trained, pi and ntk would otherwise run a NaN or negative factor.
    """
    trained = int(hf_config["max_position_embeddings"])
    factor = default_factor(trained, longest) if factor is None else factor
    YarnConfig(factor=factor, original_max_position=trained)
    return factor


def default_factor(trained: int, longest: int) -> float:
    """The extension factor when none is given: the smallest power of two, at least 2, whose
    extended context (factor x trained) holds `longest` tokens (prompt and generated).

    One rule for generate, eval and bench. At least 2, so that a comparison at lengths
    inside the trained context still exercises the extension; a power of two, so that a
    length just past a multiple (16k + 8 generated on an 8k model) gets the next setting
    that is commonly run (4), not a fractional one (2.001).
    """
    need = max(1.0, longest / trained)
    return float(max(2, 2 ** math.ceil(math.log2(need))))
