"""Engines in Ray actors, as `generate --replicas` and `bench sweep` start them.

One place for what an engine actor needs from a cluster that may have several nodes:
- **resources** (`engine_resources`): on a cluster with GPUs, the TP x PP GPUs its engine
  uses, so no two engines share a GPU. One rank: the actor holds the GPU. Several: a
  placement group of one GPU bundle per rank (vLLM's Ray executor takes at most one GPU
  per bundle and places its workers in the group its driver runs in,
  vllm/v1/executor/ray_utils.py:initialize_ray_cluster); the actor, vLLM's driver, runs
  in the first bundle and its engine gets `distributed_executor_backend="ray"`. On a
  CPU-only cluster the actor declares CPUs only; tensor parallelism there is vLLM's mp
  executor inside the actor (yarn_vllm.tools.engine_args binds its ranks' cores).
- **what its node has** (`check_node`, run in the actor before the engine): the model
  path and our plugin's vLLM entry point, each missing one a UserError naming the node.
- **bounded waits**: a deadline counted from submission, and failures kept with their
  causal chain (`failure`), not only the last line of the last exception.
"""

from __future__ import annotations

import os
import re
import time

from yarn_vllm.errors import UserError
from yarn_vllm.tools.cpu import parallel_sizes


def connect(address: str | None = None, num_cpus: int | None = None, **init) -> None:
    """Join the Ray cluster at `address`, or start a local one (`num_cpus`), once per process."""
    import ray

    if ray.is_initialized():
        return  # a caller's cluster (e.g. a script after its own ray.init)
    if address:
        ray.init(address=address, **init)
    else:
        ray.init(num_cpus=num_cpus, include_dashboard=False, **init)


def cluster_has_gpus() -> bool:
    import ray

    return ray.cluster_resources().get("GPU", 0) > 0


def engine_resources(llm_kwargs: dict, *, num_cpus: float, gpus: bool,
                     resources: dict | None = None, engine_in_actor: bool = True) -> dict:
    """What one engine actor asks Ray for (no Ray call: tested without a cluster).

    {"options": actor options, "bundles": placement-group bundles or None, "strategy",
     "llm_kwargs": engine arguments the placement implies}. `gpus`: the cluster has GPUs.
    `resources`: custom Ray resources, e.g. {"node_b": 1} to choose a node.
    `engine_in_actor`: the engine runs in the actor's process (replicas), so vLLM's Ray
    executor can place its ranks in the actor's placement group, one GPU bundle each (PP
    stages may then span nodes); otherwise (sweeps: the engine is a subprocess, which Ray
    does not know) the group is one bundle of TP x PP GPUs on one node, which the actor
    holds and its engine's mp executor uses (Ray sets CUDA_VISIBLE_DEVICES for it).
    """
    tp, pp = parallel_sizes(llm_kwargs, "engine")
    world = tp * pp
    custom = {"resources": dict(resources)} if resources else {}
    if not gpus or world == 1:
        return {"options": {"num_cpus": num_cpus, "num_gpus": 1 if gpus else 0, **custom},
                "bundles": None, "strategy": None, "llm_kwargs": {}}
    driver = {"CPU": num_cpus, **(resources or {})}  # the actor: vLLM's driver process
    if engine_in_actor:
        return {"options": {"num_cpus": num_cpus, "num_gpus": 0, **custom},
                "bundles": [{"GPU": 1, **driver}] + [{"GPU": 1} for _ in range(world - 1)],
                # TP alone on one node (an all-reduce every layer); pipeline stages may spread
                "strategy": "STRICT_PACK" if pp == 1 else "PACK",
                "llm_kwargs": {"distributed_executor_backend": "ray"}}
    return {"options": {"num_cpus": num_cpus, "num_gpus": world, **custom},
            "bundles": [{"GPU": world, **driver}], "strategy": "STRICT_PACK",
            "llm_kwargs": {"distributed_executor_backend": "mp"}}


def start_actor(actor_cls, request: dict, *args, env: dict | None = None,
                **options) -> tuple[object, object]:
    """(actor handle, placement group or None) for `request` (engine_resources); returns at
    once: the actor is scheduled whenever the cluster can give it what it asks for."""
    import ray

    opts = {**request["options"], **options}
    if env:
        opts["runtime_env"] = {"env_vars": env}
    group = None
    if request["bundles"]:
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        group = ray.util.placement_group(request["bundles"], strategy=request["strategy"])
        # capture: vLLM's Ray executor, started inside the actor, finds the group as its own
        opts["scheduling_strategy"] = PlacementGroupSchedulingStrategy(
            group, placement_group_bundle_index=0,
            placement_group_capture_child_tasks=request["llm_kwargs"].get(
                "distributed_executor_backend") == "ray")
    return ray.remote(actor_cls).options(**opts).remote(*args), group


def stop_actor(actor, group=None) -> None:
    import ray

    ray.kill(actor, no_restart=True)
    if group is not None:
        ray.util.remove_placement_group(group)


def node_name() -> str:
    """This process's Ray node, as errors name it: "node 127.0.0.1 (abc123def456)"."""
    import ray

    return (f"node {ray.util.get_node_ip_address()} "
            f"({ray.get_runtime_context().get_node_id()[:12]})")


def check_node(model: str | None, plugin_version: str | None = None) -> dict:
    """In an actor, before its engine: this node has `model` (when it is a path) and our
    plugin (its vLLM entry point, enabled, the driver's version); else a UserError naming
    the node. Returns {"node", "node_id", "pid"}."""
    import ray
    from importlib.metadata import version

    from yarn_vllm.tools.engine_args import check_plugin_installed

    where = node_name()
    if model is not None and not os.path.exists(model):
        raise UserError("model", f"{model} does not exist on Ray {where}", "put the model at "
                        "the same path on every node (shared storage or a copy), or name one "
                        "each node can download", source="cluster")
    check_plugin_installed(os.environ, source=f"Ray {where}")
    here = version("yarn-vllm")
    if plugin_version is not None and here != plugin_version:
        raise UserError("yarn-vllm", f"is {here} on Ray {where} but {plugin_version} on the "
                        "driver", "install the same yarn-vllm on every node", source="cluster")
    return {"node": where, "node_id": ray.get_runtime_context().get_node_id(),
            "pid": os.getpid()}


def check_every_node(model: str | None = None) -> list[dict]:
    """check_node on every alive node of the connected cluster (each a task pinned there);
    the first node that lacks the model or the plugin raises its UserError."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    check = ray.remote(num_cpus=0)(check_node)
    refs = [check.options(scheduling_strategy=NodeAffinitySchedulingStrategy(
        node["NodeID"], soft=False)).remote(model, plugin_version())
        for node in ray.nodes() if node["Alive"]]
    try:
        return ray.get(refs, timeout=120)
    except ray.exceptions.RayTaskError as e:
        mistake = user_error_in(e)
        if mistake is None:
            raise
        raise mistake from None


def local_path(model: str) -> str | None:
    """`model` when it is a path on this machine (every node must have it too), else None
    (a hub name each node resolves for itself)."""
    return os.path.abspath(model) if os.path.exists(model) else None


def plugin_version() -> str:
    from importlib.metadata import version

    return version("yarn-vllm")


# ---- failures and deadlines ---------------------------------------------------------------

_ANSI = re.compile(r"\x1b\[[0-9;]*m")  # Ray colours the actor's name in its errors
_EXCEPTION_LINE = re.compile(r"^(?:[\w.]+\.)?\w*(?:Error|Exception|Exit|Interrupt)\b.*")


def failure(exc: BaseException) -> dict:
    """{"error": one line, "error_chain": [lines]} for a failed actor or task; a UserError
    in the chain is the one line.

    The chain keeps every exception on the way from the first cause to what we caught:
    each exception's first line, every line of its text that names an exception (a
    traceback's cause printed inside a worker's log), and its last line. A Ray error's
    last line alone is often "Executor: all workers exited gracefully"; its cause is in
    the middle.
    """
    chain, seen, last = [], set(), None
    e = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        lines = [ln.strip() for ln in _ANSI.sub("", str(e)).splitlines() if ln.strip()]
        head = f"{type(e).__name__}: {lines[0]}" if lines else type(e).__name__
        tail = lines[-1:] if len(lines) > 1 else []
        last = last or (tail[0] if tail else None)
        for line in [head, *(ln for ln in lines[1:-1] if _EXCEPTION_LINE.match(ln)), *tail]:
            if line[:400] not in chain:
                chain.append(line[:400])
        e = _cause_of(e)
    mistake = user_error_in(exc)
    if mistake is not None:  # a user's mistake (e.g. a path a node lacks): its one line
        return {"error": str(mistake), "error_chain": chain}
    causes = [ln for ln in chain[1:] if _EXCEPTION_LINE.match(ln)]
    summary = [chain[0], *causes[:1], *([last] if last else [])]
    return {"error": " <- ".join(dict.fromkeys(summary)), "error_chain": chain}


def user_error_in(exc: BaseException) -> UserError | None:
    """The UserError a worker raised, found along `exc`'s causal chain, else None.

    The deepest one: Ray's own error is an instance of the cause's class too
    ("RayTaskError(UserError)"), but its text is the worker's whole traceback.
    """
    found, seen = None, set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, UserError):
            found = exc
        exc = _cause_of(exc)
    return found


def _cause_of(e: BaseException) -> BaseException | None:
    cause = getattr(e, "cause", None)  # a Ray error carries the worker's exception here
    if isinstance(cause, BaseException) and cause is not e:
        return cause
    return e.__cause__ or e.__context__


def unschedulable(request: dict, waited_s: float, timeout_s: float) -> str:
    """Why an actor that never started is given up on, with what the cluster had free."""
    asked = dict(request["options"].get("resources", {}),
                 CPU=request["options"].get("num_cpus", 1))
    if request["options"].get("num_gpus"):
        asked["GPU"] = request["options"]["num_gpus"]
    if request["bundles"]:
        asked = {"placement group": request["bundles"]}
    return (f"never started: no worker came up within timeout_s={timeout_s:g} s of submission "
            f"({waited_s:.1f} s); it asks for {asked}, the cluster has {free_resources()} free")


def free_resources() -> dict:
    """The cluster's free CPUs, GPUs and custom resources (not memory or node markers)."""
    import ray

    return {k: v for k, v in ray.available_resources().items()
            if not k.startswith(("node:", "memory", "object_store"))}


class Deadline:
    """Seconds left of `timeout_s` counted from now (submission), for bounded ray.get/wait."""

    def __init__(self, timeout_s: float):
        self.timeout_s = timeout_s
        self.start = time.monotonic()

    def left(self) -> float:
        return max(0.0, self.timeout_s - (time.monotonic() - self.start))

    def elapsed(self) -> float:
        return time.monotonic() - self.start
