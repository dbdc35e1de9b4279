"""The sweep file: a validated grid of benchmark engine configurations.

    model: smollm2-135m            # HF folder or the default model's name
    output: bench_results/sweep.jsonl
    num_cpus: 2                    # declared by each configuration's Ray actor
    timeout_s: 1800                # per configuration, engine start included
    retries: 1                     # a dead worker is retried this many times
    resources: {node_b: 1}         # optional: custom Ray resources each actor asks for
    context_lengths: [1024, 2048]  # fields below are per configuration ...
    batch_sizes: [1]
    output_tokens: 32
    factor: 4.0
    grid:                          # ... and the grid varies any of them
      method: [vllm-yarn, yarn, trained, yarn-dynamic]

Every combination of the grid's lists is one configuration, run by one engine. In the grid a
list-valued field takes either lists or single values (`context_lengths: [1024, 2048]` there
means one configuration at 1,024 and one at 2,048). Unknown keys, wrong types and missing
fields are errors (yarn_vllm.errors.UserError) naming the field and the fix.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import numbers
import os

from yarn_vllm.yarn.config import YarnConfig
from yarn_vllm.errors import UserError
from yarn_vllm.tools.methods import METHODS


def _positive_int(v):
    return isinstance(v, int) and not isinstance(v, bool) and v > 0


def _positive_number(v):
    return isinstance(v, numbers.Real) and not isinstance(v, bool) and 0 < v < math.inf


def _factor(v):
    """What YarnConfig takes as a factor: finite and >= 1 (YAML's .inf and .nan are not)."""
    if not isinstance(v, numbers.Real) or isinstance(v, bool):
        return False
    try:
        YarnConfig(factor=v)
    except UserError:
        return False
    return True


# field -> (check, what it must be, an example)
CONFIG_FIELDS = {
    "method": (lambda v: v in METHODS, f"one of {', '.join(METHODS)}", "yarn"),
    "context_lengths": (lambda v: isinstance(v, list) and v and all(map(_positive_int, v)),
                        "a non-empty list of positive integers", "[1024, 2048]"),
    "batch_sizes": (lambda v: isinstance(v, list) and v and all(map(_positive_int, v)),
                    "a non-empty list of positive integers", "[1, 4]"),
    "output_tokens": (_positive_int, "a positive integer", "32"),
    "factor": (lambda v: v is None or _factor(v), "a finite number >= 1 (YaRN extends, it "
               "does not compress)", "4.0"),
    "repeats": (_positive_int, "a positive integer", "1"),
    "llm_kwargs": (lambda v: isinstance(v, dict), "a mapping of vLLM LLM(...) arguments",
                   "{dtype: float32}"),
}
CONFIG_DEFAULTS = {"batch_sizes": [1], "output_tokens": 32, "factor": None, "repeats": 1,
                   "llm_kwargs": {}}
SWEEP_FIELDS = {
    "model": (lambda v: isinstance(v, str) and v, "a model folder or name", "smollm2-135m"),
    "output": (lambda v: isinstance(v, str) and v, "a .jsonl path", "bench_results/sweep.jsonl"),
    "num_cpus": (_positive_number, "a finite positive number of CPUs per configuration", "2"),
    "timeout_s": (_positive_number, "a finite positive number of seconds", "1800"),
    "retries": (lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 0,
                "a whole number >= 0", "1"),
    "grid": (lambda v: isinstance(v, dict) and v, "a mapping of field -> list of values",
             "{method: [vllm-yarn, yarn]}"),
    "resources": (lambda v: isinstance(v, dict) and all(
        isinstance(k, str) and _positive_number(n) for k, n in v.items()),
        "a mapping of Ray resource name -> positive amount", "{node_b: 1}"),
}
SWEEP_DEFAULTS = {"model": "smollm2-135m", "num_cpus": 2, "timeout_s": 1800, "retries": 1,
                  "resources": {}, "grid": {}}
LIST_FIELDS = ("context_lengths", "batch_sizes")


def _check(source, table, field, value, label=None):
    check, what, example = table[field]
    if not check(value):
        raise UserError(label or field, f"is {value!r}, not {what}",
                        f"write e.g. `{field}: {example}`", source=source)


def _unknown(source, keys, allowed, where=""):
    for key in keys:
        if key not in allowed:
            raise UserError(where + str(key), "is not a sweep setting",
                            f"use only: {', '.join(sorted(allowed))}", source=source)


def config_id(config: dict) -> str:
    """A stable id for a configuration: what a rerun matches finished results by."""
    blob = json.dumps(config, sort_keys=True, separators=(",", ":"))
    return hashlib.sha1(blob.encode()).hexdigest()[:12]


def parse_sweep(raw, source: str = "sweep") -> dict:
    """Validate a loaded sweep mapping: {"settings": {...}, "configs": [config, ...]}."""
    if not isinstance(raw, dict):
        raise UserError("(top level)", f"is a {type(raw).__name__}",
                        "write a mapping of `key: value` lines, e.g. `model: smollm2-135m`",
                        source=source)
    _unknown(source, raw, set(SWEEP_FIELDS) | set(CONFIG_FIELDS))
    stem = os.path.splitext(os.path.basename(source))[0] or "sweep"
    settings = {**SWEEP_DEFAULTS, "output": os.path.join("bench_results", f"{stem}.jsonl"),
                **{k: v for k, v in raw.items() if k in SWEEP_FIELDS}}
    for field, value in settings.items():
        if field in raw:  # defaults are valid (an absent grid means one configuration)
            _check(source, SWEEP_FIELDS, field, value)
    base = {**CONFIG_DEFAULTS, **{k: v for k, v in raw.items() if k in CONFIG_FIELDS}}
    for field in base:
        _check(source, CONFIG_FIELDS, field, base[field])
    grid = settings.pop("grid")
    _unknown(source, grid, set(CONFIG_FIELDS), where="grid.")
    axes = []
    for field, values in grid.items():
        if not isinstance(values, list) or not values:
            raise UserError(f"grid.{field}", f"is {values!r}, not a non-empty list",
                            f"list the values to sweep, e.g. `{field}: [a, b]`", source=source)
        if field in LIST_FIELDS:
            values = [v if isinstance(v, list) else [v] for v in values]
        for v in values:
            _check(source, CONFIG_FIELDS, field, v, label=f"grid.{field}")
        axes.append([(field, v) for v in values])
    for field in ("method", "context_lengths"):
        if field not in base and field not in grid:
            _, what, example = CONFIG_FIELDS[field]
            raise UserError(field, "is missing", f"set it at top level or under grid, e.g. "
                            f"`{field}: {example}` ({what})", source=source)
    configs = []
    for point in itertools.product(*axes):
        cfg = {"model": settings["model"], **base, **dict(point)}
        if cfg not in configs:
            configs.append(cfg)
    return {"settings": settings, "configs": configs}


def load_sweep(path: str) -> dict:
    import yaml

    try:
        with open(path) as f:
            raw = yaml.safe_load(f)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise UserError("(file)", f"is not valid YAML{where}",
                        "write `key: value` lines; lists as [a, b]", source=path) from None
    return parse_sweep(raw if raw is not None else {}, source=path)
