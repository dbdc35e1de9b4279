"""Engines in Ray actors on a cluster of several nodes: placement, node checks, deadlines,
failures kept with their cause, and the resources each actor asks for.

The two-node tests run a Ray cluster of two nodes on this machine (two_nodes.py: both on
127.0.0.1, node b without one folder) with cheap stand-ins for engines; the resource
requests are checked without any cluster, as a GPU cluster would get them.
"""

from __future__ import annotations

import os
import sys
import time

import pytest

from yarn_vllm.errors import UserError
from yarn_vllm.tools.bench.sweep import Claims, read_results, run_sweep
from yarn_vllm.tools.bench.sweep_config import config_id
from yarn_vllm.tools.ray_actors import engine_resources, failure

QUIET = {"log": lambda *_: None}


# ---- what an engine actor asks for (no cluster, no GPU) --------------------------------------

@pytest.mark.parametrize("kwargs, gpus, in_actor, want", [
    ({}, False, True, {"options": {"num_cpus": 2, "num_gpus": 0}, "bundles": None}),
    ({"tensor_parallel_size": 2}, False, True,  # CPU: mp ranks inside the actor, bound cores
     {"options": {"num_cpus": 2, "num_gpus": 0}, "bundles": None}),
    ({}, True, True, {"options": {"num_cpus": 2, "num_gpus": 1}, "bundles": None}),
    ({"tensor_parallel_size": 2}, True, True,  # vLLM's Ray executor in the actor's group
     {"options": {"num_cpus": 2, "num_gpus": 0}, "strategy": "STRICT_PACK",
      "bundles": [{"GPU": 1, "CPU": 2}, {"GPU": 1}],
      "llm_kwargs": {"distributed_executor_backend": "ray"}}),
    ({"tensor_parallel_size": 2, "pipeline_parallel_size": 2}, True, True,  # stages may spread
     {"strategy": "PACK", "bundles": [{"GPU": 1, "CPU": 2}, {"GPU": 1}, {"GPU": 1}, {"GPU": 1}]}),
    ({"tensor_parallel_size": 4}, True, False,  # the engine a subprocess: GPUs the actor holds
     {"options": {"num_cpus": 2, "num_gpus": 4}, "strategy": "STRICT_PACK",
      "bundles": [{"GPU": 4, "CPU": 2}], "llm_kwargs": {"distributed_executor_backend": "mp"}}),
])
def test_engine_actors_ask_for_the_gpus_their_engine_uses(kwargs, gpus, in_actor, want):
    got = engine_resources(kwargs, num_cpus=2, gpus=gpus, engine_in_actor=in_actor)
    assert {k: got[k] for k in want} == want
    if gpus:  # every rank's GPU reserved, none shared: TP x PP GPUs in all
        world = kwargs.get("tensor_parallel_size", 1) * kwargs.get("pipeline_parallel_size", 1)
        assert got["options"]["num_gpus"] + sum(b.get("GPU", 0) for b in got["bundles"] or []
                                                if not got["options"]["num_gpus"]) == world


def test_custom_resources_choose_the_node_and_bad_sizes_are_one_line():
    got = engine_resources({"tensor_parallel_size": 2}, num_cpus=1, gpus=True,
                           resources={"node_b": 1})
    assert got["options"]["resources"] == {"node_b": 1} and got["bundles"][0]["node_b"] == 1
    with pytest.raises(UserError, match="`--tensor-parallel-size` is 0"):
        engine_resources({"tensor_parallel_size": 0}, num_cpus=1, gpus=False)


def test_a_failure_keeps_its_causal_chain():
    """The last line alone ("all workers exited gracefully") hides the cause."""
    try:
        try:
            raise ValueError("token id 9 is outside the vocabulary")
        except ValueError as e:
            raise RuntimeError("engine failed (exit 1):\nTraceback (most recent call last):\n"
                               "  File x\nValueError: token id 9 is outside the vocabulary\n"
                               "[...]\nExecutor: all workers exited gracefully") from e
    except RuntimeError as e:
        got = failure(e)
    assert got["error_chain"][0] == "RuntimeError: engine failed (exit 1):"
    assert got["error_chain"][-1] == "Executor: all workers exited gracefully"
    assert got["error"] == ("RuntimeError: engine failed (exit 1): <- ValueError: token id 9 is "
                            "outside the vocabulary <- Executor: all workers exited gracefully")


# ---- two nodes on this machine ---------------------------------------------------------------
# slow: the two nodes start in ~20-35 s here and the tests take ~60 s more on 2 shared cores
two_nodes = pytest.mark.slow

def echo_work(config: dict) -> dict:
    """Stands in for an engine: where it ran; sleeps; or fails with a chained cause."""
    import ray

    if config.get("fail"):
        try:
            raise KeyError("the first cause")
        except KeyError as e:
            raise RuntimeError("engine failed:\nValueError: the middle\nthe last line") from e
    time.sleep(config.get("sleep", 0))
    return {"node_id": ray.get_runtime_context().get_node_id()}


class EchoReplica:
    """EngineReplica's contract without an engine: checks its node, echoes its prompts."""

    def __init__(self, model, llm_kwargs, version, model_is_path):
        self.args = model, version, model_is_path

    def start(self):
        from yarn_vllm.tools.ray_actors import check_node

        model, version, model_is_path = self.args
        self.node = check_node(model if model_is_path else None, version)["node"]
        return self.node

    def generate(self, prompts, sampling):
        return [{"prompt_token_ids": p, "token_ids": p[:1], "text": self.node,
                 "finish_reason": "length"} for p in prompts]


@pytest.fixture(scope="module")
def cluster(two_node_cluster):
    import ray

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers can't import us
    return two_node_cluster


def _configs(names, **extra):
    return [{"name": n, **extra} for n in names]


@two_nodes
def test_sweep_places_work_on_both_nodes_and_records_where(cluster, tmp_path):
    import ray

    out = str(tmp_path / "s.jsonl")
    report = run_sweep(_configs(["a", "b"], sleep=2), out, num_cpus=1, timeout_s=120,
                       work=echo_work, **QUIET)
    assert len(report["ok"]) == 2, report["failed"]
    nodes = {r["result"]["node_id"] for r in report["ok"]}
    assert nodes == {n["NodeID"] for n in ray.nodes() if n["Alive"]}  # each node got work
    assert all(r["node"].startswith("node 127.0.0.1 (") for r in report["ok"])


@two_nodes
def test_a_model_on_one_node_only_is_a_clear_error_naming_node_and_path(cluster, tmp_path):
    _, hidden = cluster
    out = str(tmp_path / "s.jsonl")
    t0 = time.monotonic()
    report = run_sweep(_configs(["on_b"], model=hidden), out, num_cpus=1, timeout_s=120,
                       resources={"node_b": 1}, work=echo_work, **QUIET)
    [rec] = report["failed"]
    assert rec["error"].startswith(f"cluster: `model` {hidden} does not exist on Ray node "
                                   "127.0.0.1 (") and "\n" not in rec["error"]
    assert "Fix: put the model at the same path on every node" in rec["error"]
    assert time.monotonic() - t0 < 60  # an error, not a wait for timeout_s
    ok = run_sweep(_configs(["on_a"], model=hidden), out, num_cpus=1, timeout_s=120,
                   resources={"node_a": 1}, work=echo_work, **QUIET)
    assert len(ok["ok"]) == 1


@two_nodes
def test_an_unschedulable_worker_times_out_from_submission_and_releases_its_claim(cluster,
                                                                                  tmp_path):
    """Both nodes' CPUs held by another actor: the worker never starts."""
    import ray

    @ray.remote(num_cpus=1)
    class Holder:
        def node(self):
            return ray.get_runtime_context().get_node_id()

    holders = [Holder.options(resources={r: 1}).remote() for r in ("node_a", "node_b")]
    ray.get([h.node.remote() for h in holders])
    out = str(tmp_path / "s.jsonl")
    [config] = _configs(["starved"])
    try:
        t0 = time.monotonic()
        report = run_sweep([config], out, num_cpus=1, timeout_s=4, work=echo_work, poll_s=0.2,
                           **QUIET)
        waited = time.monotonic() - t0
    finally:
        for h in holders:
            ray.kill(h)
    [rec] = report["failed"]
    assert rec["error"].startswith("never started: no worker came up within timeout_s=4 s "
                                   "of submission") and "'CPU': 1" in rec["error"]
    assert 4 <= rec["seconds"] < 8 and waited < 30
    assert read_results(out)[config_id(config)]["status"] == "failed"
    assert Claims(out).take(config_id(config))  # released: another sweep may take it


@two_nodes
def test_a_failed_record_keeps_first_and_last_lines(cluster, tmp_path):
    out = str(tmp_path / "s.jsonl")
    report = run_sweep(_configs(["bad"], fail=True), out, num_cpus=1, timeout_s=120,
                       work=echo_work, **QUIET)
    [rec] = report["failed"]
    chain = rec["error_chain"]
    assert chain[0].startswith("RayTaskError") and "engine failed:" in " ".join(chain)
    assert "ValueError: the middle" in chain and "the last line" in chain
    assert any("KeyError" in line and "the first cause" in line for line in chain)


@two_nodes
def test_the_plugin_is_checked_on_each_node(cluster):
    import ray

    from yarn_vllm.tools.ray_actors import check_node, plugin_version

    check = ray.remote(num_cpus=0)(check_node)
    ok = ray.get(check.options(resources={"node_b": 0.01}).remote(None, plugin_version()))
    assert ok["node"].startswith("node 127.0.0.1")
    off = check.options(resources={"node_b": 0.01},
                        runtime_env={"env_vars": {"VLLM_PLUGINS": "other"}})
    with pytest.raises(UserError, match="`VLLM_PLUGINS` is 'other', which leaves out yarn_vllm"):
        try:
            ray.get(off.remote(None, plugin_version()))
        except ray.exceptions.RayTaskError as e:
            raise e.cause from None
    with pytest.raises(ray.exceptions.RayTaskError, match="is 0.1.0 on Ray node 127.0.0.1"):
        ray.get(check.remote(None, "9.9"))


@two_nodes
def test_every_node_checked_at_once_names_the_one_without_the_model(cluster):
    from yarn_vllm.tools.ray_actors import check_every_node

    _, model = cluster
    assert len(check_every_node(os.path.dirname(model))) == 2
    with pytest.raises(UserError, match=f"`model` {model} does not exist on Ray node"):
        check_every_node(model)


@two_nodes
def test_replicas_spread_over_both_nodes_and_keep_input_order(cluster):
    from yarn_vllm.tools.replicas import generate_replicated

    address, _ = cluster
    prompts = [[i, i + 1] for i in range(5)]
    got = generate_replicated(os.path.dirname(__file__), {}, prompts, {}, 2, num_cpus=1,
                              address=address,
                              timeout_s=120, actor_cls=EchoReplica, **QUIET)
    assert [g["prompt_token_ids"] for g in got] == prompts
    nodes = {g["text"] for g in got}
    assert len(nodes) == 2, nodes  # one replica per node


@two_nodes
def test_replicas_fail_by_their_deadline_or_with_the_node_that_lacks_the_model(cluster,
                                                                               tmp_path):
    from yarn_vllm.tools.replicas import generate_replicated

    address, hidden = cluster
    t0 = time.monotonic()
    with pytest.raises(TimeoutError, match=r"replica\(s\) 3 did not start within 5 s of "
                                           "submission"):
        generate_replicated(str(tmp_path), {}, [[1]] * 3, {}, 3, num_cpus=1, timeout_s=5,
                            actor_cls=EchoReplica, **QUIET)
    assert time.monotonic() - t0 < 30
    with pytest.raises(UserError) as e:
        generate_replicated(hidden, {}, [[1]] * 2, {}, 2, num_cpus=1, timeout_s=120,
                            actor_cls=EchoReplica, **QUIET)
    assert str(e.value).startswith(f"cluster: `model` {hidden} does not exist on Ray node "
                                   "127.0.0.1 (") and "\n" not in str(e.value)
