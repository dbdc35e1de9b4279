"""What the subcommands share: the YaRN flags, vLLM pass-through flags and list values."""

from __future__ import annotations

import argparse
import math

from yarn_vllm.tools.redact import HIDDEN, is_secret
from yarn_vllm.yarn.config import MODES, YarnConfig
from yarn_vllm.errors import UserError
from yarn_vllm.tools.models import DEFAULT_MODEL

FACTOR_HELP = ("extension factor (default: the smallest power of two >= 2 whose extended "
               "context holds the longest input; yarn_vllm.tools.methods.default_factor)")
# YaRN flag (argparse dest) -> YarnConfig field
YARN_FLAGS = {"factor": "factor", "target_context": "target_context",
              "original_max_position": "original_max_position", "beta_fast": "beta_fast",
              "beta_slow": "beta_slow", "yarn_mode": "mode", "dynamic_headroom": "dynamic_headroom",
              "dynamic_scale_step": "dynamic_scale_step", "request_factors": "request_factors",
              "request_reserve": "request_reserve", "request_escalate": "request_escalate"}


# ---- list values ----------------------------------------------------------------------

def positive_ints(text: str) -> list[int]:
    """'1024,2048' -> [1024, 2048]; lengths, sizes and counts, so every value must be > 0."""
    try:
        values = [int(x) for x in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"is {text!r}, not a comma-separated list of integers") from None
    if any(v <= 0 for v in values):
        raise argparse.ArgumentTypeError(f"is {text!r}: every value must be positive")
    return values


def floats(text: str) -> list[float]:
    """'1,2,4' -> [1.0, 2.0, 4.0]."""
    try:
        return [float(x) for x in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"is {text!r}, not a comma-separated list of numbers") from None


def depths(text: str) -> list[float]:
    """Needle depths: fractions of the filler in [0, 1]."""
    values = floats(text)
    if not all(0.0 <= v <= 1.0 for v in values):
        raise argparse.ArgumentTypeError(f"is {text!r}: every depth must be in [0, 1]")
    return values


def method_names(text: str) -> list[str]:
    """'trained,yarn' -> ['trained', 'yarn'], each a key of yarn_vllm.tools.methods.METHODS."""
    from yarn_vllm.tools.methods import METHODS

    names = text.split(",")
    for name in names:
        if name not in METHODS:
            raise argparse.ArgumentTypeError(f"names unknown method {name!r}; choose from "
                                             f"{', '.join(METHODS)}")
    return names


# ---- flags ----------------------------------------------------------------------------

def add_model_flag(p: argparse.ArgumentParser, help: str | None = None) -> None:
    p.add_argument("--model", default=DEFAULT_MODEL,
                   help=help or f"HF folder or hub name (default: {DEFAULT_MODEL}, "
                                "converted once)")


def add_yarn_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("YaRN")
    g.add_argument("--yarn-config", help="YAML file with YaRN settings (flags override it)")
    g.add_argument("--factor", type=float, help="context extension factor s")
    g.add_argument("--target-context", type=int, help="extended length; factor = this / original")
    g.add_argument("--original-max-position", type=int,
                   help="trained context length (default: the model's max_position_embeddings)")
    g.add_argument("--beta-fast", type=float)
    g.add_argument("--beta-slow", type=float)
    g.add_argument("--yarn-mode", choices=list(MODES))
    g.add_argument("--dynamic-headroom", type=float,
                   help="dynamic mode: run each sequence at up to this multiple of the scale "
                        "its length needs, capped at --factor (default 1, the paper's rule)")
    g.add_argument("--dynamic-scale-step", type=float,
                   help="dynamic mode: round each scale up to a multiple of this (e.g. 0.25), "
                        "so that prompts of nearby lengths share cached blocks (default: exact)")
    g.add_argument("--request-factors", type=floats,
                   help="request mode: the ascending scales a request may get, e.g. 1,2,4 "
                        "(default 1, 2, 4, ... up to --factor)")
    g.add_argument("--request-reserve", type=int,
                   help="request mode: tokens of room an open-ended request (no max_tokens) "
                        "gets at admission and an escalation adds (default 512)")
    g.add_argument("--request-escalate", action=argparse.BooleanOptionalAction, default=None,
                   help="request mode: move a request that outgrows its scale's window to the "
                        "next scale and recompute it (default on; --no-request-escalate keeps "
                        "its scale, running past its window)")
    g.add_argument("--no-yarn", action="store_true", help="run the model as trained")


def yarn_flags_given(args) -> dict[str, tuple[str, object]]:
    """{YarnConfig field: (flag, value)} for each YaRN flag on the command line."""
    return {field: ("--" + dest.replace("_", "-"), getattr(args, dest))
            for dest, field in YARN_FLAGS.items() if getattr(args, dest, None) is not None}


def yarn_config_from_args(args) -> YarnConfig | None:
    """The YAML file's settings with the flags over them; None for --no-yarn or no setting.

    A flag only reaches YarnConfig when given, so a field YarnConfig does not have yet
    (request_factors) costs nothing until it is used.
    """
    if args.no_yarn:
        return None
    values = {}
    if args.yarn_config:
        values.update(YarnConfig.from_yaml(args.yarn_config).__dict__)
        values = {k: v for k, v in values.items() if v is not None}
    # A length given on the command line replaces the YAML's, whichever way it is said.
    if args.factor is not None:
        values.pop("target_context", None)
    if args.target_context is not None:
        values.pop("factor", None)
    values.update({field: value for field, (_, value) in yarn_flags_given(args).items()})
    return YarnConfig.from_dict(values) if values else None


def passthrough_kwargs(unknown: list[str]) -> dict:
    """['--max-num-seqs', '4', '--enforce-eager'] -> {'max_num_seqs': 4, 'enforce_eager': True}.

    Values are read as YAML, so JSON objects (--hf-overrides '{...}') arrive as dicts.
    """
    import yaml

    kwargs, i = {}, 0
    while i < len(unknown):
        flag = unknown[i]
        if not flag.startswith("--"):
            raise UserError(flag, "is an unexpected argument",
                            "pass vLLM options as --key value, e.g. --max-num-seqs 4",
                            source="command line")
        key, _, value = flag[2:].partition("=")
        key = key.replace("-", "_")
        if not value:
            if i + 1 < len(unknown) and not unknown[i + 1].startswith("--"):
                value = unknown[i + 1]
                i += 1
            else:
                value = "true"
        try:
            kwargs[key] = yaml.safe_load(value)
        except yaml.YAMLError:
            shown = HIDDEN if is_secret(key) else value[:60]
            raise UserError(f"--{key.replace('_', '-')}", f"is not valid JSON: {shown!r}",
                            "quote a JSON value, e.g. '{\"max_position_embeddings\": 16384}'",
                            source="command line") from None
        i += 1
    return kwargs


# ---- numbers that parse but make no sense ------------------------------------------------

def check_factor(factor: float | None, source: str, flag: str = "--factor") -> None:
    """A factor as YarnConfig takes one (finite, >= 1), else its UserError under `flag`."""
    if factor is None:
        return
    try:
        YarnConfig(factor=factor)
    except UserError as e:
        raise UserError(flag, e.problem, e.fix, source=source) from None


def check_numbers(args, source: str, *, positive=(), non_negative=()) -> None:
    """UserError for the first flag (argparse dest) in `positive` not in (0, inf), or in
    `non_negative` not in [0, inf); flags left unset (None) pass."""
    for dests, low, ok in ((positive, "above 0", lambda v: 0 < v < math.inf),
                           (non_negative, "0 or more", lambda v: 0 <= v < math.inf)):
        for dest in dests:
            value = getattr(args, dest)
            if value is not None and not ok(value):
                raise UserError("--" + dest.replace("_", "-"), f"is {value}",
                                f"give a finite number {low}", source=source)
