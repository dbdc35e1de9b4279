"""`yarn-vllm generate --replicas N`: one batch spread over N engine replicas in Ray actors.

The prompts are cut into N contiguous shards (sizes differ by at most one); replica i runs
shard i with the same engine arguments and sampling, and the outputs are put back in input
order. Each replica is an actor (a fresh process) whose engine core runs in that process, so
greedy outputs equal one engine's. On CPU each replica is pinned to its own share of the
cores when there are enough of them.
"""

from __future__ import annotations

import os
import time
from types import SimpleNamespace

from yarn_vllm.tools.cpu import core_groups, omp_bind, shards
from yarn_vllm.tools.engine_worker import ENGINE_IN_PROCESS


class EngineReplica:
    """A Ray actor holding one vLLM engine."""

    def __init__(self, model: str, llm_kwargs: dict):
        from vllm import LLM

        self.llm = LLM(model=model, **llm_kwargs)

    def ready(self) -> bool:
        return True

    def generate(self, prompts: list, sampling: dict) -> list[dict]:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        inputs = [TokensPrompt(prompt_token_ids=p) if isinstance(p, list) else p for p in prompts]
        results = self.llm.generate(inputs, SamplingParams(**sampling), use_tqdm=False)
        return [{"prompt_token_ids": list(r.prompt_token_ids),
                 "token_ids": list(r.outputs[0].token_ids), "text": r.outputs[0].text,
                 "finish_reason": r.outputs[0].finish_reason} for r in results]


def generate_replicated(model: str, llm_kwargs: dict, prompts: list, sampling: dict,
                        replicas: int, *, num_cpus: float | None = None, log=print,
                        timing: dict | None = None) -> list[dict]:
    """Generate `prompts` (strings or token-id lists) over `replicas` actors, in input order.

    `llm_kwargs` should already hold the CPU defaults (yarn_vllm.tools.cpu.apply_cpu_defaults);
    the VLLM_* settings of this process go to every replica. `timing`, if given, receives
    "generate_s": the generation time once every engine has started.
    """
    import ray

    if replicas < 1:
        raise ValueError(f"--replicas is {replicas}; give 1 or more")
    if not ray.is_initialized():
        ray.init(include_dashboard=False, log_to_driver=False)
    parts = shards(len(prompts), replicas)
    cluster_cpus = ray.cluster_resources().get("CPU", 1)
    per = num_cpus if num_cpus is not None else cluster_cpus / len(parts)
    base_env = {k: v for k, v in os.environ.items() if k.startswith("VLLM_")}
    base_env.update(ENGINE_IN_PROCESS, TOKENIZERS_PARALLELISM="false")
    if "VLLM_CPU_KVCACHE_SPACE" in base_env:  # the node's KV budget, shared by the replicas
        base_env["VLLM_CPU_KVCACHE_SPACE"] = str(
            max(1, int(float(base_env["VLLM_CPU_KVCACHE_SPACE"])) // len(parts)))
    actor_cls = ray.remote(EngineReplica)
    actors = []
    groups = core_groups(len(parts)) or [None] * len(parts)  # too few cores: no pinning
    for cores in groups:
        env = dict(base_env)
        if cores is not None and "VLLM_CPU_OMP_THREADS_BIND" not in os.environ:
            env["VLLM_CPU_OMP_THREADS_BIND"] = omp_bind(cores)
        actors.append(actor_cls.options(num_cpus=per, runtime_env={"env_vars": env})
                      .remote(model, llm_kwargs))
    log(f"yarn-vllm: {len(prompts)} prompts over {len(parts)} replicas "
        f"({', '.join(str(len(p)) for p in parts)} each, {per:g} CPUs per replica)")
    try:
        ray.get([a.ready.remote() for a in actors])  # engines started
        t0 = time.perf_counter()
        refs = [a.generate.remote([prompts[j] for j in part], sampling)
                for a, part in zip(actors, parts)]
        out = [None] * len(prompts)
        for part, shard_out in zip(parts, ray.get(refs)):
            for j, o in zip(part, shard_out):
                out[j] = o
        if timing is not None:
            timing["generate_s"] = time.perf_counter() - t0
        return out
    finally:
        for a in actors:
            ray.kill(a, no_restart=True)


def generate_replicated_outputs(model: str, llm_kwargs: dict, prompts: list[dict], sampling: dict,
                                replicas: int) -> tuple[list, float]:
    """For `yarn-vllm generate`: prompt rows in, (RequestOutput-like objects, seconds) out."""
    timing = {}
    outs = generate_replicated(model, llm_kwargs,
                               [p["prompt_token_ids"] if "prompt_token_ids" in p else p["prompt"]
                                for p in prompts], sampling, replicas, timing=timing)
    return [SimpleNamespace(prompt_token_ids=o["prompt_token_ids"],
                            outputs=[SimpleNamespace(token_ids=o["token_ids"], text=o["text"],
                                                     finish_reason=o["finish_reason"])])
            for o in outs], timing["generate_s"]
