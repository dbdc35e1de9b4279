"""Run the evaluations: one vLLM engine per method, each in its own process.

Results are plain dicts, {"model", "factor", ..., "methods": {method: {...}}}, where each
method's entry records the dtype its engine ran in; yarn_vllm.tools.eval.report renders them.
"""

from __future__ import annotations

import time
from importlib import resources

from yarn_vllm.tools.engine_worker import escalation_counts, run_engine
from yarn_vllm.errors import UserError
from yarn_vllm.tools.eval.perplexity import aggregate, default_bucket_edges, sliding_windows, token_nll
from yarn_vllm.tools.methods import checked_factor, hf_config_of, method, method_overrides


def default_text() -> str:
    """The shipped public-domain text (see yarn_vllm/data/SOURCES.md)."""
    return resources.files("yarn_vllm").joinpath("data/lcet10.txt").read_text(encoding="utf-8")


def run_method(model: str, name: str, hf_config: dict, factor: float, prompts, sampling,
               llm_kwargs: dict | None = None) -> dict:
    """`prompts` through one engine serving method `name` (yarn_vllm.tools.engine_worker's result)."""
    overrides = method_overrides(name, hf_config, factor)
    # Room for the generated tokens past a window of exactly s x L. The RoPE maths
    # reads factor and original from rope_parameters, so this changes only the limit.
    overrides["max_position_embeddings"] += 16
    kwargs = {"hf_overrides": overrides, "max_model_len": overrides["max_position_embeddings"],
              "enable_prefix_caching": False, **(llm_kwargs or {})}
    # introspect: False, no layer classes wanted, so the engine needs no insecure serialization;
    # in-process: the worker exists for this one engine, and a second process that imports
    # vLLM again would only add to its start
    return run_engine({"model": model, "llm_kwargs": kwargs, "prompts": prompts,
                       "sampling": sampling, "progress": True, "introspect": False},
                      plugins=method(name).plugins, in_process=True)


def passkey_sampling(name: str) -> dict:
    """Eight tokens hold the answer; an open-ended method sends no max_tokens, as a chat
    client does, and stops at the end of the answer's sentence instead."""
    if method(name).open_ended:
        return {"max_tokens": None, "stop": ["\n", "."], "ignore_eos": False}
    return {"max_tokens": 8}


def eval_perplexity(model: str, methods: list[str], windows: list[int], *, stride: int | None = None,
                    max_windows: int | None = 1, text: str | None = None,
                    factor: float | None = None, llm_kwargs: dict | None = None,
                    log=print) -> dict:
    """Perplexity per method and window size: {method: {window: aggregate(...)}}."""
    from transformers import AutoTokenizer

    hf = hf_config_of(model)
    ids = AutoTokenizer.from_pretrained(model).encode(text or default_text(),
                                                      add_special_tokens=False)
    plan = {w: sliding_windows(len(ids), w, stride or w, max_windows) for w in windows}
    prompts = [ids[x.begin:x.end] for w in windows for x in plan[w]]
    s = checked_factor(hf, max(windows), factor)
    results = {"model": model, "factor": s, "text_tokens": len(ids), "windows": windows,
               "stride": stride, "methods": {}}
    for name in methods:
        t0 = time.perf_counter()
        out = run_method(model, name, hf, s, prompts,
                         {"max_tokens": 1, "prompt_logprobs": 0, "detokenize": False},
                         llm_kwargs)
        outputs, per_window = iter(out["outputs"]), {}
        for w in windows:
            nll = [token_nll(next(outputs)["prompt_logprobs"], p)
                   for p in (ids[x.begin:x.end] for x in plan[w])]
            per_window[str(w)] = aggregate(plan[w], nll, default_bucket_edges(w))
        results["methods"][name] = {"seconds": time.perf_counter() - t0,
                                    "generate_seconds": out["generate_seconds"],
                                    "dtype": out["dtype"], "ppl": per_window,
                                    **escalation_counts(out)}
        log(f"  {name:>15}: " + "  ".join(f"{w}: {per_window[str(w)]['ppl']:.2f}"
                                          for w in windows)
            + f"  ({time.perf_counter() - t0:.0f} s, {out['dtype']})")
    return results


def eval_passkey(model: str, methods: list[str], lengths: list[int], depths: list[float],
                 trials: int, *, factor: float | None = None, llm_kwargs: dict | None = None,
                 log=print) -> dict:
    """Passkey accuracy per method, length and depth."""
    from transformers import AutoTokenizer

    from yarn_vllm.tools.tasks.passkey import make_passkey_prompt

    hf = hf_config_of(model)
    tok = AutoTokenizer.from_pretrained(model)
    try:
        cases = [(L, d, t, make_passkey_prompt(tok, L, d, seed=1000 * t + int(100 * d) + L))
                 for L in lengths for d in depths for t in range(trials)]
    except ValueError as e:  # a length too short for the task's text
        raise UserError("lengths", f"are {lengths}: {e}", "give longer lengths",
                        source="eval passkey") from None
    s = checked_factor(hf, max(lengths) + 16, factor)
    results = {"model": model, "factor": s, "lengths": lengths, "depths": depths,
               "trials": trials, "methods": {}}
    for name in methods:
        t0 = time.perf_counter()
        out = run_method(model, name, hf, s, [c[3].token_ids for c in cases],
                         passkey_sampling(name), llm_kwargs)
        grid, answers = {}, []
        for (L, d, t, prompt), o in zip(cases, out["outputs"]):
            cell = grid.setdefault(f"{L}", {}).setdefault(f"{d}", {"found": 0, "trials": 0})
            cell["found"] += prompt.is_found(o["text"])
            cell["trials"] += 1
            answers.append({"length": L, "depth": d, "trial": t, "key": prompt.key,
                            "text": o["text"]})
        results["methods"][name] = {"seconds": time.perf_counter() - t0,
                                    "generate_seconds": out["generate_seconds"],
                                    "dtype": out["dtype"], "grid": grid, "answers": answers,
                                    **escalation_counts(out)}
        log(f"  {name:>15}: " + "  ".join(
            f"{L}: {sum(c['found'] for c in grid[str(L)].values())}/"
            f"{sum(c['trials'] for c in grid[str(L)].values())}" for L in lengths)
            + f"  ({time.perf_counter() - t0:.0f} s, {out['dtype']})")
    return results
