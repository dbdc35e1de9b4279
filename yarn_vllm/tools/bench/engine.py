"""One benchmark engine in a fresh process: start vLLM once, time every (context, batch) case.

Spec (JSON): {"model", "method", "llm_kwargs", "cases": [{"context", "batch"}],
              "output_tokens", "repeats", "vocab_size", "seed"}
Result: {"method", "rotary_classes", "attention_backends", "dtype", "engine_start_s",
         "results": [summarise(...) per case], "escalations", "recomputed_tokens"}

The engine core runs inside the worker process (VLLM_ENABLE_V1_MULTIPROCESSING=0), so a
killed worker takes its whole engine with it, steps are timed without IPC in between, and
LLM.apply_model reads the layer classes without pickling (no insecure serialization).
Progress goes to stdout as `PROGRESS {json}` lines; vLLM's logs go to stderr.
"""

from __future__ import annotations

import json
import random
import sys
import time
from dataclasses import replace

from yarn_vllm.tools.bench.measure import Step, summarise
from yarn_vllm.tools.engine_worker import (ENGINE_IN_PROCESS, PROGRESS, engine_dtype,
                                           escalation_counts, exit_with_parent, run_worker,
                                           scheduler_record)
from yarn_vllm.tools.stepped import Arrival, render, run_stepped

_REQUESTS = 0  # request ids, unique within the worker


def run_bench_engine(spec: dict, *, plugins: bool, timeout: float | None = None,
                     on_progress=None) -> dict:
    """Run `spec` in a fresh process (plugins=False: VLLM_PLUGINS="", vLLM's own layers).

    The process dies with its parent and is killed, whole process group, after `timeout` s.
    """
    return run_worker("yarn_vllm.tools.bench.engine", spec, plugins=plugins, timeout=timeout,
                      env=ENGINE_IN_PROCESS, on_progress=on_progress)


def _prompts(rng: random.Random, vocab_size: int, context: int, batch: int) -> list[list[int]]:
    low = min(100, vocab_size // 4)  # skip the special tokens at the start of most vocabularies
    return [[rng.randrange(low, vocab_size) for _ in range(context)] for _ in range(batch)]


def time_batch(llm, prompts: list[list[int]], output_tokens: int) -> dict:
    """Step the engine by hand over one batch (yarn_vllm.tools.stepped); see
    yarn_vllm.tools.bench.measure."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    # every step's token counts: CUMULATIVE outputs (SamplingParams' default), not
    # LLM.generate's FINAL_ONLY
    params = SamplingParams(temperature=0.0, max_tokens=output_tokens, ignore_eos=True,
                            detokenize=False)
    global _REQUESTS
    arrivals = []
    for p in prompts:
        _REQUESTS += 1
        arrivals.append(Arrival(f"bench-{_REQUESTS}", TokensPrompt(prompt_token_ids=p), params))
    inputs = render(llm, [a.prompt for a in arrivals])
    arrivals = [replace(a, prompt=inp) for a, inp in zip(arrivals, inputs)]
    counts = {a.request_id: 0 for a in arrivals}
    steps = []

    def step(s) -> None:
        for out in s.outputs:
            counts[out.request_id] = len(out.outputs[0].token_ids)
        steps.append(Step(s.t_end, dict(counts)))

    t_start = time.perf_counter()  # rendering stays outside, as before
    run_stepped(llm, arrivals, step, rendered=True)
    return summarise(t_start, steps, len(prompts[0]), len(prompts), output_tokens)


def _median_case(runs: list[dict]) -> dict:
    """The run with the median end-to-end time, plus every run's total for the spread."""
    ordered = sorted(runs, key=lambda r: r["total_s"])
    out = dict(ordered[len(ordered) // 2])
    out["repeats"] = len(runs)
    out["total_s_all"] = [r["total_s"] for r in runs]
    return out


def main(spec_path: str, out_path: str) -> None:
    from vllm import LLM

    from yarn_vllm.vllm_seam.introspect import attention_backend_classes, rotary_layer_classes

    exit_with_parent()
    with open(spec_path) as f:
        spec = json.load(f)
    t0 = time.perf_counter()
    kwargs = {"seed": 0, "enable_prefix_caching": False, "skip_tokenizer_init": True,
              **spec.get("llm_kwargs", {})}
    llm = LLM(model=spec["model"], **kwargs)
    start_s = time.perf_counter() - t0
    rng = random.Random(spec.get("seed", 0))
    vocab = spec["vocab_size"]
    time_batch(llm, _prompts(rng, vocab, 16, 1), 2)  # warm-up: first-call costs
    results = []
    for case in spec["cases"]:
        runs = [time_batch(llm, _prompts(rng, vocab, case["context"], case["batch"]),
                           spec["output_tokens"]) for _ in range(spec.get("repeats", 1))]
        row = dict(_median_case(runs), method=spec["method"])
        results.append(row)
        print(PROGRESS + json.dumps(row), flush=True)
    out = {"method": spec["method"], "engine_start_s": start_s, "dtype": engine_dtype(llm),
           "rotary_classes": llm.apply_model(rotary_layer_classes)[0],
           "attention_backends": llm.apply_model(attention_backend_classes)[0],
           "results": results, **escalation_counts(scheduler_record(llm, {}))}
    with open(out_path, "w") as f:
        json.dump(out, f)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
