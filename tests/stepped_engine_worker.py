"""An engine stepped by hand, with requests arriving at given steps, and a record of each step.

yarn_vllm.tools.engine_worker submits a batch at a time (`LLM.generate` until it is done), so no
request there ever arrives while others decode. This worker runs the engine through
yarn_vllm.tools.stepped (the loop `generate`'s progress line and the benchmark use), with the
engine core in this process (VLLM_ENABLE_V1_MULTIPROCESSING=0), and records what vLLM's
scheduler decided each step: how many tokens of each request it ran, and which requests it
preempted (ids as given in the spec). The scheduler is only watched.

Run it with `yarn_vllm.tools.engine_worker.run_worker(MODULE, spec, env=stepped_env())`.
Spec (JSON): {"model", "llm_kwargs", "sampling": {...},
              "requests": [{"id", "prompt_token_ids", "arrive_step", "sampling": {...}}]}
Result: {"attention_backends", "rotary_classes", "prefix_caching", "chunked_prefill",
         "dtype", "num_preemptions",
         "steps": [{"scheduled": {id: num_tokens}, "preempted": [id],
                    "computed": {id: tokens in the KV cache before the step}}],
         "outputs": {id: {"token_ids", "logprobs", "prompt_logprobs", "num_cached_tokens"}}}
"""

from __future__ import annotations

import json
import os
import sys

from yarn_vllm.tools.engine_worker import ENGINE_IN_PROCESS

MODULE = "stepped_engine_worker"


def stepped_env() -> dict:
    """The worker's environment: importable from tests/, engine core in-process."""
    here = os.path.dirname(os.path.abspath(__file__))
    path = os.environ.get("PYTHONPATH")
    return {"PYTHONPATH": here + (os.pathsep + path if path else ""),
            **ENGINE_IN_PROCESS}


def main(spec_path: str, out_path: str) -> None:
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    from yarn_vllm.tools.engine_worker import (engine_dtype, exit_with_parent, logprob_steps,
                                               metric_counter)
    from yarn_vllm.tools.stepped import Arrival, run_stepped
    from yarn_vllm.vllm_seam.introspect import attention_backend_classes, rotary_layer_classes

    exit_with_parent()
    with open(spec_path) as f:
        spec = json.load(f)
    llm = LLM(model=spec["model"], **{"seed": 0, **spec.get("llm_kwargs", {})})
    sampling = {"temperature": 0.0, "ignore_eos": True, **spec.get("sampling", {})}
    arrivals = [Arrival(r["id"], TokensPrompt(prompt_token_ids=r["prompt_token_ids"]),
                        SamplingParams(**{**sampling, **r.get("sampling", {})}), r["arrive_step"])
                for r in spec["requests"]]
    steps: list = []
    finished = run_stepped(llm, arrivals, lambda s: steps.append(
        {"scheduled": s.scheduled, "preempted": s.preempted, "computed": s.computed}))
    outputs = {}
    for rid, out in finished.items():
        c = out.outputs[0]
        outputs[rid] = {"token_ids": list(c.token_ids), "logprobs": logprob_steps(c.logprobs),
                        "prompt_logprobs": logprob_steps(out.prompt_logprobs),
                        "num_cached_tokens": out.num_cached_tokens}
    config = llm.llm_engine.vllm_config
    result = {"attention_backends": llm.apply_model(attention_backend_classes)[0],
              "rotary_classes": llm.apply_model(rotary_layer_classes)[0],
              "prefix_caching": bool(config.cache_config.enable_prefix_caching),
              "chunked_prefill": bool(config.scheduler_config.enable_chunked_prefill),
              "dtype": engine_dtype(llm),
              "num_preemptions": metric_counter(llm, "vllm:num_preemptions"),
              "steps": steps, "outputs": outputs}
    with open(out_path, "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
