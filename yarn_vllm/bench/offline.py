"""`yarn-vllm bench offline`: each mode's engine in its own process, all cases timed in it."""

from __future__ import annotations

import time

from yarn_vllm.bench.engine import run_bench_engine
from yarn_vllm.bench.modes import available_modes, mode_engine

DEFAULT_CONTEXTS = (1024, 2048)
DEFAULT_BATCHES = (1,)


def hf_config_of(model: str) -> dict:
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(model).to_dict()


def default_factor(hf_config: dict, longest: int) -> float:
    """The smallest whole factor >= 2 whose extended context holds `longest` tokens."""
    trained = hf_config["max_position_embeddings"]
    return float(max(2, -(-longest // trained)))


def mode_spec(model: str, mode: str, hf_config: dict, *, contexts, batches, output_tokens: int,
              factor: float, repeats: int = 1, llm_kwargs: dict | None = None,
              seed: int = 0) -> tuple[dict, bool]:
    """(engine spec, plugins) for one mode; every mode gets the same length limit."""
    max_len = max(contexts) + output_tokens + 16
    engine = mode_engine(mode, hf_config, factor, max_len)
    kwargs = {"hf_overrides": engine.hf_overrides, "max_model_len": max_len,
              **(llm_kwargs or {})}
    kwargs.setdefault("max_num_seqs", max(batches))
    spec = {"model": model, "mode": mode, "llm_kwargs": kwargs, "output_tokens": output_tokens,
            "cases": [{"context": c, "batch": b} for c in contexts for b in batches],
            "repeats": repeats, "vocab_size": int(hf_config["vocab_size"]), "seed": seed}
    return spec, engine.plugins


def run_offline(model: str, modes, contexts, batches, *, output_tokens: int = 32,
                factor: float | None = None, repeats: int = 1, llm_kwargs: dict | None = None,
                timeout: float | None = None, log=print) -> dict:
    """Benchmark every mode; returns {"settings", "modes": {mode: engine result}, "rows"}."""
    hf = hf_config_of(model)
    longest = max(contexts) + output_tokens
    factor = factor or default_factor(hf, longest)
    modes = available_modes(modes, log=log)
    out = {"settings": {"model": model, "modes": modes, "contexts": list(contexts),
                        "batches": list(batches), "output_tokens": output_tokens,
                        "factor": factor, "repeats": repeats, "llm_kwargs": llm_kwargs or {}},
           "modes": {}, "rows": []}
    for i, mode in enumerate(modes, 1):
        spec, plugins = mode_spec(model, mode, hf, contexts=contexts, batches=batches,
                                  output_tokens=output_tokens, factor=factor, repeats=repeats,
                                  llm_kwargs=llm_kwargs)
        log(f"[{i}/{len(modes)}] {mode}: starting its engine "
            f"({'plugin on' if plugins else 'plugin off, vLLM layers'})")
        t0 = time.perf_counter()

        def progress(row, mode=mode):
            log(f"    {mode:>12} ctx {row['context']:>6} batch {row['batch']:>3}: "
                f"prefill {row['prefill_tok_s']:8.1f} tok/s  decode "
                f"{row['decode_tok_s'] or 0:7.1f} tok/s  e2e {row['total_s']:7.2f} s")

        result = run_bench_engine(spec, plugins=plugins, timeout=timeout, on_progress=progress)
        result["wall_s"] = time.perf_counter() - t0
        out["modes"][mode] = result
        out["rows"] += result["results"]
        log(f"    {mode} done in {result['wall_s']:.0f} s (engine start "
            f"{result['engine_start_s']:.0f} s; rotary layer "
            f"{', '.join(c.rsplit('.', 1)[-1] for c in result['rotary_classes']) or '?'})")
    return out
