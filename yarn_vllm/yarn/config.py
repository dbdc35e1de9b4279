"""YarnConfig: one validated description of a YaRN extension.

It is built from a model's HF config, a YAML file or CLI-style flags, and it
emits exactly the `hf_overrides` that vLLM 0.32 needs (vLLM does not scale
`max_position_embeddings` by the YaRN factor itself, and refuses a longer
`max_model_len` otherwise).
"""

from __future__ import annotations

import copy
import dataclasses
import math
from typing import Any, Mapping

from yarn_vllm.errors import UserError
from yarn_vllm.yarn.hf_config import (check_rotary_dims, config_value, rope_parameters_of,
                                    rope_theta_of, rope_type_of)

MODES = ("static", "dynamic", "request")  # the interface: rope_parameters["yarn_mode"]
_UNSCALED_ROPE_TYPES = ("default", None)
# Positions past 2**24 are no longer exact in fp32, where every RoPE angle is formed.
MAX_CONTEXT = 1 << 24
# The room an open-ended request gets at admission, in tokens (README "Which mode"): most
# chat answers fit in it, so a prompt up to L - 512 runs as trained and escalates only if
# its answer outgrows that room; a larger reserve moves more prompts off "as trained".
DEFAULT_REQUEST_RESERVE = 512


@dataclasses.dataclass
class YarnConfig:
    """YaRN settings, in the names used across yarn-vllm (see yarn_math).

    Either `factor` or `target_context` is given; `original_max_position`
    defaults to the model's `max_position_embeddings` when resolved against a
    model. `mode` says how a sequence's scale s is chosen (yarn_vllm.yarn.scale_policy):

      static   s = factor for every request (vLLM's own behaviour);
      dynamic  s = max(1, length / original_max_position), per sequence and step
               (keys cached before RoPE, our attention backend);
      request  s chosen once per request at admission from `request_factors`
               (keys cached rotated, vLLM's own attention).

    `dynamic_headroom` c >= 1 (dynamic mode only) lets s run ahead of the length,
    s = max(1, min(c length / original, max(factor, length / original))); 1 is the paper.
    `dynamic_scale_step` (dynamic mode only, opt-in): s is rounded up to a multiple of
    it, so that prompts of nearby lengths prefill at one scale and share cached blocks;
    None (the default) keeps s exact.
    `request_factors` (request mode only): the ascending scales a request may get,
    from 1 up to `factor` (the last must be `factor`, so every position the engine
    allows has a scale); None means 1, 2, 4, ... and always `factor` itself.
    `request_reserve` (request mode only): the tokens of room an open-ended request
    (no max_tokens) gets at admission, and that an escalation adds past the position
    that triggered it. `request_escalate` (request mode only): a request that needs a
    position past its scale's window moves to the next listed scale and is recomputed
    (True), or keeps its scale and runs past its window (False).
    """

    factor: float | None = None
    original_max_position: int | None = None
    target_context: int | None = None
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mode: str = "static"
    truncate: bool = True
    mscale: float | None = None
    mscale_all_dim: float | None = None
    attention_factor: float | None = None
    dynamic_headroom: float = 1.0
    dynamic_scale_step: float | None = None
    request_factors: tuple[float, ...] | None = None
    request_reserve: int = DEFAULT_REQUEST_RESERVE
    request_escalate: bool = True

    def __post_init__(self):
        for name, kind in _FIELD_TYPES.items():
            setattr(self, name, _coerce(name, getattr(self, name), kind))
        if self.mode not in MODES:
            raise UserError("mode", f"is {self.mode!r}", f"use one of {', '.join(MODES)}")
        if self.original_max_position is not None and not (
                0 < self.original_max_position <= MAX_CONTEXT):
            raise UserError("original_max_position", f"is {self.original_max_position}",
                            "give the model's trained context length, a positive integer")
        if self.factor is not None and not (1.0 <= self.factor < math.inf):
            raise UserError("factor", f"is {self.factor}",
                            "give a finite number >= 1 (YaRN extends, it does not compress), "
                            "e.g. 4.0 to extend 4x")
        if self.target_context is not None and not 0 < self.target_context <= MAX_CONTEXT:
            raise UserError("target_context", f"is {self.target_context}",
                            f"give the extended context length in tokens, at most {MAX_CONTEXT}")
        if self.factor is not None and self.target_context is not None:
            raise UserError("target_context", f"({self.target_context}) and factor "
                            f"({self.factor}) are both set", "set only one of them")
        if self.factor is not None and self.original_max_position is not None:
            _check_extended(self.factor, self.original_max_position)
        if not math.inf > self.beta_fast > self.beta_slow > 0:
            raise UserError("beta_fast", f"is {self.beta_fast} with beta_slow {self.beta_slow}",
                            "need finite beta_fast > beta_slow > 0 (defaults 32 and 1)")
        for name in ("mscale", "mscale_all_dim", "attention_factor"):
            value = getattr(self, name)
            if value is not None and not (0 < value < math.inf):
                raise UserError(name, f"is {value}", "give a finite positive number, or leave "
                                "it unset for YaRN's 0.1 ln(s) + 1")
        if not (1.0 <= self.dynamic_headroom < math.inf):
            raise UserError("dynamic_headroom", f"is {self.dynamic_headroom}",
                            "give a finite number >= 1 (1 is the paper's Dynamic YaRN; "
                            "2 runs each sequence at twice the scale its length needs)")
        if self.dynamic_headroom != 1.0 and self.mode != "dynamic":
            raise UserError("dynamic_headroom", f"is {self.dynamic_headroom} with mode "
                            f"{self.mode!r}", "set mode: dynamic, or drop dynamic_headroom")
        if self.dynamic_scale_step is not None:
            if self.mode != "dynamic":
                raise UserError("dynamic_scale_step", f"is {self.dynamic_scale_step} with mode "
                                f"{self.mode!r}", "set mode: dynamic, or drop dynamic_scale_step")
            if not 0 < self.dynamic_scale_step < math.inf:
                raise UserError("dynamic_scale_step", f"is {self.dynamic_scale_step}",
                                "give a finite step > 0, e.g. 0.25, or leave it unset")
        if self.request_factors is not None:
            if self.mode != "request":
                raise UserError("request_factors", f"are set with mode {self.mode!r}",
                                "set mode: request, or drop request_factors")
            _check_request_factors(self.request_factors, self.factor)
        if self.request_reserve < 0:
            raise UserError("request_reserve", f"is {self.request_reserve}",
                            "give a whole number of tokens >= 0, e.g. 512")
        for name, default in (("request_reserve", DEFAULT_REQUEST_RESERVE),
                              ("request_escalate", True)):
            if getattr(self, name) != default and self.mode != "request":
                raise UserError(name, f"is {getattr(self, name)} with mode {self.mode!r}",
                                f"set mode: request, or drop {name}")

    def _factor_from_target(self, original: int) -> float:
        if self.target_context < original:
            raise UserError(
                "target_context", f"({self.target_context}) is shorter than the original "
                f"context ({original})", f"give a target of at least {original} tokens")
        return self.target_context / original

    # ---- construction -------------------------------------------------

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "YarnConfig":
        """From a flat mapping of field names; unknown keys are an error, not ignored."""
        if not isinstance(values, Mapping):
            raise UserError("yarn", f"is {values!r}, not a mapping",
                            "write `key: value` lines, e.g. `factor: 4.0`")
        if "yarn" in values:
            values = values["yarn"] or {}
            if not isinstance(values, Mapping):
                raise UserError("yarn", f"is {values!r}, not a mapping",
                                "indent the settings under `yarn:`, e.g. `  factor: 4.0`")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(map(str, set(values) - names))
        if unknown:
            raise UserError(unknown[0], "is not a YaRN setting",
                            f"use only: {', '.join(sorted(names))}")
        return cls(**values)

    @classmethod
    def from_yaml(cls, path: str) -> "YarnConfig":
        """From a YAML file holding the fields, at top level or under a `yarn:` key."""
        import yaml

        try:
            with open(path) as f:
                values = yaml.safe_load(f) or {}
        except yaml.YAMLError as e:
            raise UserError(path, f"is not valid YAML ({e.__class__.__name__})",
                                  "write `key: value` lines, e.g. `factor: 4.0`") from None
        if not isinstance(values, dict):
            raise UserError(path, "does not hold a mapping", "write `factor: 4.0` etc.")
        return cls.from_dict(values)

    @classmethod
    def of_model(cls, hf_config) -> "YarnConfig | None":
        """The YaRN settings of a model that asks for YaRN; None for any other RoPE.

        What the plugin serves: every YaRN config is validated here, in every mode,
        while other RoPE variants (llama3, longrope, ...) pass through untouched.
        """
        if rope_type_of(rope_parameters_of(hf_config)) != "yarn":
            return None
        return cls.from_hf_config(hf_config)

    @classmethod
    def from_hf_config(cls, hf_config) -> "YarnConfig | None":
        """The YaRN settings a model's config already asks for, or None if it uses plain RoPE.

        Reads `rope_parameters` (transformers >= 5) or the legacy `rope_scaling`.
        """
        params = rope_parameters_of(hf_config)
        rope_type = rope_type_of(params)
        if rope_type in _UNSCALED_ROPE_TYPES:
            return None
        if rope_type != "yarn":
            raise UserError("rope_type", f"is {rope_type!r} in the model config",
                                  "yarn-vllm serves rope_type 'yarn' (or plain RoPE to extend)")
        max_position = config_value(hf_config, "max_position_embeddings")
        original = params.get("original_max_position_embeddings") or max_position
        factor = params.get("factor")
        if factor is None and max_position and original:
            factor = max_position / original  # HF's rule when a YaRN config omits the factor
        return cls(
            factor=factor,
            original_max_position=original,
            beta_fast=params.get("beta_fast") or 32.0,
            beta_slow=params.get("beta_slow") or 1.0,
            mode=params.get("yarn_mode", "static"),
            truncate=params.get("truncate", True),
            mscale=params.get("mscale"),
            mscale_all_dim=params.get("mscale_all_dim"),
            attention_factor=params.get("attention_factor"),
            dynamic_headroom=params.get("yarn_dynamic_headroom", 1.0),
            dynamic_scale_step=params.get("yarn_dynamic_scale_step"),
            request_factors=params.get("yarn_request_factors"),
            request_reserve=params.get("yarn_request_reserve", DEFAULT_REQUEST_RESERVE),
            request_escalate=params.get("yarn_request_escalate", True),
        )

    # ---- use against a model -----------------------------------------

    def resolve(self, hf_config) -> "YarnConfig":
        """A copy with every field filled from the model, after checking the model can take YaRN."""
        params = rope_parameters_of(hf_config)
        rope_type = rope_type_of(params)
        if rope_type not in _UNSCALED_ROPE_TYPES + ("yarn",):
            raise UserError("rope_type", f"is {rope_type!r} in the model config",
                                  "YaRN extends plain RoPE; start from a model with rope_type "
                                  "'default' or 'yarn'")
        check_rotary_dims(hf_config)
        original = self.original_max_position
        if original is None and rope_type == "yarn":
            original = params.get("original_max_position_embeddings")
        original = original or config_value(hf_config, "max_position_embeddings")
        if not original:
            raise UserError("original_max_position", "is unknown for this model",
                                  "pass --original-max-position (the trained context length)")
        if self.factor is None and self.target_context is None:
            raise UserError("factor", "is not set", "pass --factor S or --target-context TOKENS")
        factor = self.factor or self._factor_from_target(int(original))
        _check_extended(factor, int(original))
        if self.request_factors is not None:
            _check_request_factors(self.request_factors, factor)
        # target_context stays set, so max_position is the exact target
        return _resolved(self, factor=factor, original_max_position=int(original))

    def scales_on_offer(self) -> tuple[float, ...]:
        """Request mode's scales, ascending: `request_factors`, or 1, 2, 4, ... and `factor`.

        Needs `factor` (a resolved config). Factor 8 gives (1, 2, 4, 8); 6 gives (1, 2, 4, 6).
        """
        if self.request_factors is not None:
            return self.request_factors
        scales, s = [], 1.0
        while s < self.factor:
            scales.append(s)
            s *= 2
        return tuple(scales + [float(self.factor)])

    @property
    def max_position(self) -> int:
        """The extended context length in tokens: the target, or factor x original rounded."""
        if self.target_context is not None:
            return self.target_context
        return int(round(self.factor * self.original_max_position))

    def hf_overrides(self, hf_config) -> dict:
        """The `hf_overrides` that make vLLM 0.32 serve this YaRN extension of `hf_config`."""
        cfg = self.resolve(hf_config)
        params = {"rope_type": "yarn", "factor": float(cfg.factor),
                  "original_max_position_embeddings": cfg.original_max_position,
                  "rope_theta": float(rope_theta_of(hf_config)),
                  "beta_fast": float(cfg.beta_fast), "beta_slow": float(cfg.beta_slow),
                  "truncate": cfg.truncate, "yarn_mode": cfg.mode}
        for key in ("mscale", "mscale_all_dim", "attention_factor"):
            if getattr(cfg, key) is not None:
                params[key] = float(getattr(cfg, key))
        if cfg.mode == "dynamic":
            params["yarn_dynamic_headroom"] = float(cfg.dynamic_headroom)
            if cfg.dynamic_scale_step is not None:
                params["yarn_dynamic_scale_step"] = float(cfg.dynamic_scale_step)
        if cfg.mode == "request":
            params["yarn_request_factors"] = list(cfg.scales_on_offer())
            params["yarn_request_reserve"] = cfg.request_reserve
            params["yarn_request_escalate"] = cfg.request_escalate
        partial = rope_parameters_of(hf_config).get("partial_rotary_factor")
        if partial is not None:
            params["partial_rotary_factor"] = partial
        return {"max_position_embeddings": max(cfg.max_position, cfg.original_max_position),
                "rope_parameters": params}


_FIELD_TYPES = {"factor": float, "original_max_position": int, "target_context": int,
                "beta_fast": float, "beta_slow": float, "mode": str, "truncate": bool,
                "mscale": float, "mscale_all_dim": float, "attention_factor": float,
                "dynamic_headroom": float, "dynamic_scale_step": float,
                "request_factors": tuple, "request_reserve": int, "request_escalate": bool}
_REQUIRED = ("beta_fast", "beta_slow", "mode", "truncate", "dynamic_headroom",
             "request_reserve", "request_escalate")


def _coerce(name: str, value, kind):
    """A field's value as its type, or a UserError naming the field (YAML gives strings)."""
    if value is None:
        if name in _REQUIRED:
            raise UserError(name, "is empty", f"give a {kind.__name__} or drop the key")
        return None
    if kind is bool:
        if isinstance(value, bool):
            return value
        raise UserError(name, f"is {value!r}", "use true or false")
    if kind is str:
        if not isinstance(value, str):
            raise UserError(name, f"is {value!r}, not a string", f"use one of {', '.join(MODES)}")
        return value
    if kind is tuple:
        return _coerce_factors(name, value)
    example = "4.0" if kind is float else "8192"
    try:
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise TypeError
        number = float(value)
        if kind is int and number != int(number):
            raise ValueError
    except (TypeError, ValueError, OverflowError):
        raise UserError(name, f"is {value!r}, not {'an int' if kind is int else 'a float'}",
                        f"give a plain {kind.__name__}, e.g. {example}") from None
    if not math.isfinite(number):
        raise UserError(name, f"is {value!r}", f"give a finite number, e.g. {example}")
    return int(number) if kind is int else number


def _coerce_factors(name: str, value) -> tuple[float, ...]:
    """`[1, 2, 4]`, `(1, 2)` or the flag's "1,2,4" as a tuple of floats."""
    if isinstance(value, str):
        value = [v for v in value.split(",") if v.strip()]
    if not isinstance(value, (list, tuple)) or not value:
        raise UserError(name, f"is {value!r}", "give a list of scales, e.g. [1, 2, 4]")
    return tuple(_coerce(name, v, float) for v in value)


def _check_request_factors(factors: tuple[float, ...], factor: float | None) -> None:
    fix = "list ascending scales from 1 up to `factor`, e.g. [1, 2, 4]"
    if any(s < 1.0 for s in factors):
        raise UserError("request_factors", f"are {list(factors)}, with a value below 1", fix)
    if any(b <= a for a, b in zip(factors, factors[1:])):
        raise UserError("request_factors", f"are {list(factors)}, not strictly ascending", fix)
    if factor is not None and factors[-1] != factor:
        # a last scale below factor would leave positions up to factor x L (which
        # max_model_len allows) with no scale whose window holds them
        raise UserError("request_factors", f"are {list(factors)}, ending at {factors[-1]:g} "
                        f"where factor is {factor:g}", f"end the list at factor ({factor:g}), "
                        f"e.g. {[s for s in factors if s < factor] + [factor]}")


def _check_extended(factor: float, original: int) -> None:
    if factor * original > MAX_CONTEXT:
        raise UserError("factor", f"is {factor}: {factor:g} x {original} tokens is past "
                        f"{MAX_CONTEXT} positions, where fp32 RoPE angles are no longer exact",
                        "give a smaller factor or target_context")


def _resolved(cfg: "YarnConfig", **changes) -> "YarnConfig":
    """A copy with `changes`, skipping __post_init__'s one-of check (factor and target may
    both be known once resolved)."""
    out = copy.copy(cfg)
    for k, v in changes.items():
        setattr(out, k, v)
    return out
