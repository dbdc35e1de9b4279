"""`yarn-vllm generate --replicas N`: one batch spread over N engine replicas in Ray actors.

The prompts are cut into N contiguous shards (sizes differ by at most one); replica i runs
shard i with the same engine arguments and sampling, and the outputs are put back in input
order. Each replica is an actor (a fresh process) whose engine core runs in that process, so
greedy outputs equal one engine's. Replicas spread over the cluster's nodes; on a GPU
cluster each asks for the GPUs its engine needs (yarn_vllm.tools.ray_actors), on CPU each
gets its own share of the cores when there are enough of them. Every wait is bounded by
`timeout_s` from submission; a replica whose node lacks the model path or the plugin
fails the command naming the node.
"""

from __future__ import annotations

import os
import time
from types import SimpleNamespace

from yarn_vllm.errors import UserError
from yarn_vllm.tools.cpu import core_groups, parallel_sizes, shards
from yarn_vllm.tools.engine_args import engine_setup
from yarn_vllm.tools.engine_worker import ENGINE_IN_PROCESS
from yarn_vllm.tools.ray_actors import Deadline, check_node, cluster_has_gpus, connect, \
    engine_resources, failure, free_resources, local_path, plugin_version, start_actor, \
    stop_actor, user_error_in


class EngineReplica:
    """A Ray actor holding one vLLM engine, started (`start`) once its node is checked.

    The work is a method, not the constructor, so that a failure (a UserError naming the
    node) comes back as itself rather than as the actor's death.
    """

    def __init__(self, model: str, llm_kwargs: dict, version: str, model_is_path: bool):
        self.args = model, llm_kwargs, version, model_is_path

    def start(self) -> str:
        model, llm_kwargs, version, model_is_path = self.args
        node = check_node(model if model_is_path else None, version)["node"]
        from vllm import LLM

        # this node's core binding for TP/PP ranks, unless the driver set one (one node)
        engine_setup(llm_kwargs).apply_env()
        self.llm = LLM(model=model, **llm_kwargs)
        return node

    def generate(self, prompts: list, sampling: dict) -> list[dict]:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        inputs = [TokensPrompt(prompt_token_ids=p) if isinstance(p, list) else p for p in prompts]
        results = self.llm.generate(inputs, SamplingParams(**sampling), use_tqdm=False)
        return [{"prompt_token_ids": list(r.prompt_token_ids),
                 "token_ids": list(r.outputs[0].token_ids), "text": r.outputs[0].text,
                 "finish_reason": r.outputs[0].finish_reason} for r in results]


def generate_replicated(model: str, llm_kwargs: dict, prompts: list, sampling: dict,
                        replicas: int, *, num_cpus: float | None = None, address: str | None = None,
                        timeout_s: float = 3600, log=print, timing: dict | None = None,
                        actor_cls=EngineReplica) -> list[dict]:
    """Generate `prompts` (strings or token-id lists) over `replicas` actors, in input order.

    `llm_kwargs` come from yarn_vllm.tools.engine_args (each replica's environment is built
    again there, with its share of the cores); the VLLM_* settings of this process go to
    every replica. `address`: a Ray cluster to join (default: this process's, or a local
    one). Every replica must start and generate within `timeout_s` of submission, else
    they are all stopped and TimeoutError says which were still waiting and why.
    `timing`, if given, receives "generate_s": the generation time once every engine has
    started.
    """
    import ray

    if replicas < 1:
        raise UserError("--replicas", f"is {replicas}", "give 1 or more", source="generate")
    deadline = Deadline(timeout_s)
    connect(address, log_to_driver=False)
    parts = shards(len(prompts), replicas)
    cluster_cpus = ray.cluster_resources().get("CPU", 1)
    per = num_cpus if num_cpus is not None else cluster_cpus / len(parts)
    gpus = cluster_has_gpus()
    base_env = {k: v for k, v in os.environ.items() if k.startswith("VLLM_")}
    base_env.update(ENGINE_IN_PROCESS, TOKENIZERS_PARALLELISM="false")
    tp, pp = parallel_sizes(llm_kwargs, "generate")
    # One node (this one): a share of its cores per replica, or, too few for TP x PP cores
    # each, every replica's ranks over all of them. Several nodes: each replica binds its
    # ranks on its own node (EngineReplica.start), whose cores this process cannot see.
    one_node = len([n for n in ray.nodes() if n["Alive"]]) == 1
    groups = [g if one_node and g is not None and len(g) >= tp * pp else None
              for g in (core_groups(len(parts)) or [None] * len(parts))]
    path = local_path(model)
    actors = []
    try:
        for cores in groups:
            request = engine_resources(llm_kwargs, num_cpus=per, gpus=gpus)
            kwargs = {**llm_kwargs, **request["llm_kwargs"]}
            env = dict(base_env)
            if not gpus:  # vLLM's CPU platform: this replica's cores and its ranks' binding
                engine_setup(kwargs, cores=cores, cpu=True, env=os.environ).apply_env(env)
            if "VLLM_CPU_KVCACHE_SPACE" in env:  # a node's KV budget, shared by its replicas
                env["VLLM_CPU_KVCACHE_SPACE"] = str(
                    max(1, int(float(env["VLLM_CPU_KVCACHE_SPACE"])) // len(parts)))
            # replicas spread over the nodes: an engine per node before two on one
            actors.append(start_actor(actor_cls, request, path or model, kwargs,
                                      plugin_version(), path is not None, env=env,
                                      **({} if request["bundles"] else
                                         {"scheduling_strategy": "SPREAD"})))
        log(f"yarn-vllm: {len(prompts)} prompts over {len(parts)} replicas "
            f"({', '.join(str(len(p)) for p in parts)} each, {per:g} CPUs"
            + (f", {tp * pp} GPU(s)" if gpus else "") + " per replica)")
        nodes = _wait(actors, [a.start.remote() for a, _ in actors], deadline, "start")
        log("yarn-vllm: replicas on " + ", ".join(f"{i + 1}: {n}" for i, n in enumerate(nodes)))
        t0 = time.perf_counter()
        refs = [a.generate.remote([prompts[j] for j in part], sampling)
                for (a, _), part in zip(actors, parts)]
        out = [None] * len(prompts)
        for part, shard_out in zip(parts, _wait(actors, refs, deadline, "generate")):
            for j, o in zip(part, shard_out):
                out[j] = o
        if timing is not None:
            timing["generate_s"] = time.perf_counter() - t0
        return out
    finally:
        for actor, group in actors:
            stop_actor(actor, group)


def _wait(actors: list, refs: list, deadline: Deadline, what: str) -> list:
    """Every ref's value, by the deadline: a replica's failure is raised with its cause (a
    UserError as it was raised on its node), a missed deadline as TimeoutError."""
    import ray
    from ray.exceptions import RayActorError, RayTaskError

    pending = list(refs)
    while pending:
        done, pending = ray.wait(pending, num_returns=len(pending), timeout=deadline.left())
        for ref in done:
            try:
                ray.get(ref)
            except (RayTaskError, RayActorError) as e:
                mistake = user_error_in(e)
                if mistake is not None:  # e.g. the model path missing on a node: one line
                    raise mistake from None
                i = refs.index(ref)
                raise RuntimeError(f"replica {i + 1} failed ({what}): "
                                   f"{failure(e)['error']}") from e
        if pending and deadline.left() <= 0:
            late = [str(refs.index(r) + 1) for r in pending]
            raise TimeoutError(f"replica(s) {', '.join(late)} did not {what} within "
                               f"{deadline.timeout_s:g} s of submission (--replica-timeout); "
                               f"a replica that never starts is one no node has room for "
                               f"(the cluster has {free_resources()} free)")
    return ray.get(refs)



def generate_replicated_outputs(model: str, llm_kwargs: dict, prompts: list[dict], sampling: dict,
                                replicas: int, **options) -> tuple[list, float]:
    """For `yarn-vllm generate`: prompt rows in, (RequestOutput-like objects, seconds) out;
    `options` go to generate_replicated (address, timeout_s)."""
    timing = {}
    outs = generate_replicated(model, llm_kwargs,
                               [p["prompt_token_ids"] if "prompt_token_ids" in p else p["prompt"]
                                for p in prompts], sampling, replicas, timing=timing, **options)
    return [SimpleNamespace(prompt_token_ids=o["prompt_token_ids"],
                            outputs=[SimpleNamespace(token_ids=o["token_ids"], text=o["text"],
                                                     finish_reason=o["finish_reason"])])
            for o in outs], timing["generate_s"]
