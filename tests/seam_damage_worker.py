"""Damage vLLM one seam name at a time, in this process, and record what yarn-vllm does.

`python seam_damage_worker.py YARN_MODEL PLAIN_MODEL OUT [engine]`. For each entry of
yarn_vllm.vllm_seam.vllm_names.NAMES: damage it as an upgrade would (a callable whose
parameters changed is wrapped in a `(*args, **kwargs)` function that still works; any
other name is renamed), start the plugin afresh, and build vLLM's engine config for a
YaRN model (request mode) and for a plain one, then undo the damage. With `engine`, one
damage (InputProcessor.process_inputs' signature) is kept while a real engine runs the
plain model and a YaRN model is started. VLLM_PLUGINS="" keeps vLLM from registering the
plugin behind our back; register() is called here after each damage.
"""

from __future__ import annotations

import enum
import json
import os
import sys
import traceback

os.environ["VLLM_PLUGINS"] = ""
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")


def _owner_and_attr(path: str):
    from yarn_vllm.vllm_seam.vllm_names import resolve

    head, _, attr = path.rpartition(".")
    if ":" not in head:  # a module-level name: "module:attr"
        import importlib

        module, _, attr = path.partition(":")
        return importlib.import_module(module), attr
    owner = resolve(head)
    return (owner if isinstance(owner, type) or hasattr(owner, "__path__")
            or type(owner).__name__ == "module" else type(owner)), attr


def damage(entry):
    """Damage `entry` in place; returns the function that undoes it."""
    owner, attr = _owner_and_attr(entry.path)
    if isinstance(owner, enum.EnumMeta):  # members cannot be deleted: a new enum without it
        module = sys.modules[owner.__module__]
        setattr(module, owner.__name__, enum.Enum(
            owner.__name__, {m.name: m.value for m in owner if m.name != attr}))
        return lambda: setattr(module, owner.__name__, owner)
    fields = getattr(owner, "__dataclass_fields__", None)
    saved_field = fields.pop(attr, None) if fields is not None else None
    present = attr in vars(owner)
    original = vars(owner).get(attr)
    if entry.params and present and callable(getattr(owner, attr)):
        if isinstance(original, classmethod):
            setattr(owner, attr, classmethod(lambda cls, *a, **k: original.__func__(cls, *a, **k)))
        else:
            setattr(owner, attr, lambda *a, **k: original(*a, **k))
    elif present:
        setattr(owner, attr + "_renamed", original)
        delattr(owner, attr)

    def undo():
        if present:
            setattr(owner, attr, original)
            if hasattr(owner, attr + "_renamed"):
                delattr(owner, attr + "_renamed")
        if saved_field is not None:
            fields[attr] = saved_field
    return undo


def engine_config(model: str, overrides: dict | None):
    from vllm.engine.arg_utils import EngineArgs

    extra = {"hf_overrides": overrides} if overrides else {}
    return EngineArgs(model=model, skip_tokenizer_init=True, **extra,
                      max_model_len=4096 if overrides else 1024).create_engine_config()


def outcome(fn) -> dict:
    try:
        fn()
        return {"ok": True}
    except Exception as e:  # noqa: BLE001 - recorded for the test to judge
        ours = any("yarn_vllm" in (frame.filename or "") for frame in
                   traceback.extract_tb(e.__traceback__)[-1:])
        return {"ok": False, "error": f"{type(e).__name__}: {e}"[:3000],
                "raised_in_yarn_vllm": ours}


def fresh_plugin(platform_saved: dict) -> None:
    """Forget this process's register() outcome and the platform hooks it installed."""
    from vllm.platforms import current_platform

    from yarn_vllm.vllm_seam import plugin

    plugin._STATE.clear()
    for name, value in platform_saved.items():
        setattr(type(current_platform), name, value)


def main(yarn_model: str, plain_model: str, out_path: str, engine: bool = False) -> None:
    import json as _json

    from vllm.platforms import current_platform

    from yarn_vllm.vllm_seam import plugin, vllm_names
    from yarn_vllm.yarn.config import YarnConfig

    hf = _json.load(open(os.path.join(yarn_model, "config.json")))
    overrides = YarnConfig(factor=4.0, mode="request").hf_overrides(hf)
    platform_saved = {n: vars(type(current_platform))[n]
                      for n in ("check_and_update_config", "get_attn_backend_cls")
                      if n in vars(type(current_platform))}
    results = {"undamaged": {"problems": vllm_names.problems()}}
    for entry in vllm_names.NAMES:
        undo = damage(entry)
        try:
            fresh_plugin(platform_saved)
            record = {"problems": vllm_names.problems(), "register": outcome(plugin.register)}
            record["yarn"] = outcome(lambda: engine_config(yarn_model, overrides))
            record["plain"] = outcome(lambda: engine_config(plain_model, None))
        finally:
            undo()
        results[entry.path] = record
    if engine:
        from vllm import LLM, SamplingParams

        entry = next(e for e in vllm_names.NAMES if e.path.endswith("process_inputs"))
        undo = damage(entry)
        fresh_plugin(platform_saved)
        plugin.register()
        params = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)
        kwargs = {"skip_tokenizer_init": True, "dtype": "float32", "enforce_eager": True}

        def run_plain():
            out = LLM(plain_model, max_model_len=1024, **kwargs).generate(
                [{"prompt_token_ids": [5, 6, 7]}], params, use_tqdm=False)
            results["engine_plain_tokens"] = list(out[0].outputs[0].token_ids)

        results["engine_plain"] = outcome(run_plain)
        results["engine_yarn"] = outcome(lambda: LLM(yarn_model, hf_overrides=overrides,
                                                     max_model_len=4096, **kwargs))
        undo()
    with open(out_path, "w") as f:
        json.dump(results, f)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3], engine=len(sys.argv) > 4)
