"""`yarn-vllm bench offline`: each method's engine in its own process, all cases timed in it.

Every method gets the same extension factor and the same length limit, so methods differ
only in the RoPE path (see yarn_vllm.tools.methods for what each one is).
"""

from __future__ import annotations

import time

from yarn_vllm.tools.bench.engine import run_bench_engine
from yarn_vllm.tools.redact import redact_kwargs
from yarn_vllm.tools.methods import checked_factor, hf_config_of, method, method_overrides

DEFAULT_CONTEXTS = (1024, 2048)
DEFAULT_BATCHES = (1,)


def method_spec(model: str, name: str, hf_config: dict, *, contexts, batches,
                output_tokens: int, factor: float, repeats: int = 1,
                llm_kwargs: dict | None = None, seed: int = 0) -> tuple[dict, bool]:
    """(engine spec, plugins) for one method; every method gets the same length limit."""
    max_len = max(contexts) + output_tokens + 16
    kwargs = {"hf_overrides": method_overrides(name, hf_config, factor, max_len),
              "max_model_len": max_len, **(llm_kwargs or {})}
    kwargs.setdefault("max_num_seqs", max(batches))
    spec = {"model": model, "method": name, "llm_kwargs": kwargs, "output_tokens": output_tokens,
            "cases": [{"context": c, "batch": b} for c in contexts for b in batches],
            "repeats": repeats, "vocab_size": int(hf_config["vocab_size"]), "seed": seed}
    return spec, method(name).plugins


def run_offline(model: str, methods, contexts, batches, *, output_tokens: int = 32,
                factor: float | None = None, repeats: int = 1, llm_kwargs: dict | None = None,
                timeout: float | None = None, log=print) -> dict:
    """Benchmark every method; returns {"settings", "methods": {method: engine result}, "rows"}."""
    hf = hf_config_of(model)
    factor = checked_factor(hf, max(contexts) + output_tokens, factor)
    out = {"settings": {"model": model, "methods": list(methods), "contexts": list(contexts),
                        "batches": list(batches), "output_tokens": output_tokens,
                        "factor": factor, "repeats": repeats,
                        "llm_kwargs": redact_kwargs(llm_kwargs or {})},
           "methods": {}, "rows": []}
    for i, name in enumerate(methods, 1):
        spec, plugins = method_spec(model, name, hf, contexts=contexts, batches=batches,
                                    output_tokens=output_tokens, factor=factor, repeats=repeats,
                                    llm_kwargs=llm_kwargs)
        log(f"[{i}/{len(methods)}] {name}: starting its engine "
            f"({'plugin on' if plugins else 'plugin off, vLLM layers'})")
        t0 = time.perf_counter()

        def progress(row, name=name):
            log(f"    {name:>15} ctx {row['context']:>6} batch {row['batch']:>3}: "
                f"prefill {row['prefill_tok_s']:8.1f} tok/s  decode "
                f"{row['decode_tok_s'] or 0:7.1f} tok/s  e2e {row['total_s']:7.2f} s")

        result = run_bench_engine(spec, plugins=plugins, timeout=timeout, on_progress=progress)
        result["wall_s"] = time.perf_counter() - t0
        out["methods"][name] = result
        out["rows"] += result["results"]
        log(f"    {name} done in {result['wall_s']:.0f} s (engine start "
            f"{result['engine_start_s']:.0f} s, {result['dtype']}; rotary layer "
            f"{', '.join(c.rsplit('.', 1)[-1] for c in result['rotary_classes']) or '?'})")
    return out
