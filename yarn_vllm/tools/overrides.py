"""The hf_overrides `serve` and `generate` hand to vLLM: ours (from the YaRN settings) with the
user's `--hf-overrides` merged in, and read back through YarnConfig.

vLLM sets a dict-valued override as the whole attribute, so placing the user's
`{"rope_parameters": {"rope_theta": 5e5}}` over ours would drop YaRN while the
extended length stayed. The merge is therefore key by key inside rope_parameters
(`rope_scaling`, its legacy spelling, is the same attribute in transformers 5). The
user's keys win; the merged result applied to the model's config must still be a
valid YaRN setting, and a user key that changes what a YaRN flag on our command line
set is refused, naming both.
"""

from __future__ import annotations

from yarn_vllm.yarn.config import YarnConfig
from yarn_vllm.errors import UserError

ROPE_KEYS = ("rope_parameters", "rope_scaling")
SOURCE = "--hf-overrides"


def merge_hf_overrides(ours: dict, user: dict) -> dict:
    """`user` over `ours`, rope_parameters (or rope_scaling) merged key by key."""
    merged = {**ours, **{k: v for k, v in user.items() if k not in ROPE_KEYS}}
    rope = {}
    for key in ROPE_KEYS:
        if key in user:
            if not isinstance(user[key], dict):
                raise UserError(key, f"is {user[key]!r}, not a mapping",
                                'give a JSON object, e.g. {"rope_theta": 500000}', source=SOURCE)
            rope.update(user[key])
    if rope:
        merged["rope_parameters"] = {**ours.get("rope_parameters", {}), **rope}
    return merged


def yarn_hf_overrides(hf_config: dict, yarn: YarnConfig, user: dict | None = None,
                      flags: dict[str, tuple[str, object]] | None = None) -> dict:
    """hf_overrides serving `yarn` on the model whose config is `hf_config`, with `user`'s.

    `flags`: {YarnConfig field: (flag, value)} given on our command line; a user key
    that changes one of them is a UserError naming the flag and the key.
    """
    ours = yarn.hf_overrides(hf_config)
    if user is None:
        return ours
    if not isinstance(user, dict):
        raise UserError(SOURCE, f"is {user!r}, not a JSON object",
                        'pass a mapping, e.g. \'{"max_position_embeddings": 16384}\'',
                        source="command line")
    merged = merge_hf_overrides(ours, user)
    try:
        served = _read(hf_config, merged)
    except UserError as e:  # ours is valid, so the user's keys made it wrong
        raise UserError(e.field, e.problem, e.fix, source=f"{SOURCE} merged with YaRN") from None
    if served is None:
        raise UserError("rope_parameters.rope_type", "turns YaRN off while YaRN settings are "
                        "given", "drop rope_type from --hf-overrides, or pass --no-yarn to "
                        "serve the model's own RoPE", source=SOURCE)
    want = _read(hf_config, ours)
    for field, (flag, value) in (flags or {}).items():
        if _value(served, merged, field) != _value(want, ours, field):
            keys = _culprits(hf_config, ours, user, field, _value(want, ours, field))
            raise UserError(flag, f"is {value} but --hf-overrides sets "
                            + ", ".join(f"{k}={v!r}" for k, v in keys),
                            f"give it once: drop {', '.join(k for k, _ in keys)} from "
                            f"--hf-overrides or drop {flag}", source="command line")
    return merged


def _read(hf_config: dict, overrides: dict) -> YarnConfig | None:
    """The YaRN setting vLLM's config will hold: the model's, top-level keys replaced."""
    config = {**hf_config, **overrides}
    yarn = YarnConfig.from_hf_config(config)
    return yarn.resolve(config) if yarn is not None else None


def _value(yarn: YarnConfig | None, overrides: dict, field: str):
    if yarn is None:
        return None
    if field == "target_context":  # the served length and the scale it implies
        return overrides.get("max_position_embeddings"), yarn.factor
    return getattr(yarn, field, None)


def _culprits(hf_config: dict, ours: dict, user: dict, field: str, want) -> list[tuple]:
    """The user's (key, value) pairs that each alone move `field` away from `want`."""
    singles = [(k, v, {k: v}) for k, v in user.items() if k not in ROPE_KEYS]
    singles += [(f"{key}.{k}", v, {key: {k: v}}) for key in ROPE_KEYS
                if isinstance(user.get(key), dict) for k, v in user[key].items()]
    out = []
    for path, value, part in singles:
        merged = merge_hf_overrides(ours, part)
        try:
            moved = _value(_read(hf_config, merged), merged, field) != want
        except UserError:
            moved = True
        if moved:
            out.append((path, value))
    return out or [(k, v) for k, v, _ in singles]
