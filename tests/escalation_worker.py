"""An engine that runs named request batches in order, where a later prompt may be a prefix of
an earlier request's final sequence, and reports what yarn-vllm's scheduler did.

yarn_vllm.tools.engine_worker takes fixed prompts; request mode's escalation tests need
"the first 700 tokens of what request `grow` ended with", known only after it ran. The
engine core runs in this process (ENGINE_IN_PROCESS), so its scheduler's escalations and
preemptions are read directly (yarn_vllm.vllm_seam.scheduler).

Run it with `run_worker(MODULE, spec, env=worker_env())`.
Spec (JSON): {"model", "llm_kwargs", "sampling": {...},
              "batches": [[{"name", "prompt_token_ids" | "prefix_of": name, "length": n,
                            "sampling": {...}, "cache_salt": str}]]}
Result: {"outputs": {name: {"prompt", "token_ids", "logprobs" (the chosen token's, per step),
                            "num_cached_tokens", "scale"}},
         "escalations": [{"name", "old", "new", "num_tokens", "recomputed"}],
         "preemptions": [{"name", "scale", "num_tokens", "escalation"}], "num_preemptions"}
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys

from yarn_vllm.tools.engine_worker import ENGINE_IN_PROCESS

MODULE = "escalation_worker"


def worker_env() -> dict:
    """The worker's environment: importable from tests/, engine core in-process."""
    here = os.path.dirname(os.path.abspath(__file__))
    path = os.environ.get("PYTHONPATH")
    return {"PYTHONPATH": here + (os.pathsep + path if path else ""), **ENGINE_IN_PROCESS}


def main(spec_path: str, out_path: str) -> None:
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    from yarn_vllm.tools.engine_worker import exit_with_parent, metric_counter
    from yarn_vllm.vllm_seam.introspect import engine_scheduler
    from yarn_vllm.vllm_seam.scheduler import (escalations_of, external_request_id,
                                               finished_scale_of, preemptions_of)

    exit_with_parent()
    with open(spec_path) as f:
        spec = json.load(f)
    llm = LLM(model=spec["model"], **{"seed": 0, **spec["llm_kwargs"]})
    scheduler = engine_scheduler(llm)
    base = {"temperature": 0.0, "ignore_eos": True, "logprobs": 0, "detokenize": False,
            **spec.get("sampling", {})}
    outputs, names = {}, {}
    for batch in spec["batches"]:
        prompts, params = [], []
        for r in batch:
            if "prefix_of" in r:
                done = outputs[r["prefix_of"]]
                ids = (done["prompt"] + done["token_ids"])[: r["length"]]
            else:
                ids = r["prompt_token_ids"]
            salt = {"cache_salt": r["cache_salt"]} if "cache_salt" in r else {}
            prompts.append(TokensPrompt(prompt_token_ids=ids, **salt))
            params.append(SamplingParams(**{**base, **r.get("sampling", {})}))
        for r, result in zip(batch, llm.generate(prompts, params, use_tqdm=False)):
            names[result.request_id] = r["name"]
            c = result.outputs[0]
            outputs[r["name"]] = {
                "prompt": list(result.prompt_token_ids), "token_ids": list(c.token_ids),
                "logprobs": [step[t].logprob for step, t in zip(c.logprobs, c.token_ids)],
                "num_cached_tokens": result.num_cached_tokens,
                "scale": finished_scale_of(scheduler, result.request_id)}

    def named(records):
        return [dict(dataclasses.asdict(x), name=names.get(external_request_id(x.request_id)))
                for x in records]

    out = {"outputs": outputs, "escalations": named(escalations_of(scheduler)),
           "preemptions": named(preemptions_of(scheduler)),
           "num_preemptions": metric_counter(llm, "vllm:num_preemptions")}
    with open(out_path, "w") as f:
        json.dump(out, f)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
