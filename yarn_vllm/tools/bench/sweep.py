"""`yarn-vllm bench sweep sweep.yaml`: a grid of benchmark engines as Ray work.

Each configuration runs in its own Ray actor (a fresh worker process declaring `num_cpus`),
whose engine is in turn its own process (yarn_vllm.tools.bench.engine). As many configurations run
at once as the cluster's CPUs allow. Each result is appended to the JSONL file the moment it
arrives, so a rerun skips every configuration already recorded as ok. A worker that dies is
retried `retries` times on a fresh actor, then recorded as failed; a configuration past
`timeout_s`, counted from its actor's submission (a worker no node can take counts too),
has its actor killed and is recorded as failed with why; the sweep always finishes the rest.
Each actor first checks its node (yarn_vllm.tools.ray_actors.check_node: the model path and
the plugin) and asks for the GPUs its engine needs on a GPU cluster; failed records keep
the failure's causal chain (`error_chain`) and every record names its node.

Two sweeps may share one output file: each configuration is claimed (`Claims`) before it
runs, so the second sweep leaves what the first is running to it. Appends are locked and
always start on a fresh line, so a line torn by a crash cannot swallow the next record.
"""

from __future__ import annotations

import fcntl
import json
import os
import time
from collections import deque

from yarn_vllm.tools.bench.sweep_config import config_id
from yarn_vllm.tools.ray_actors import Deadline, check_node, cluster_has_gpus, connect, \
    engine_resources, failure, local_path, plugin_version, start_actor, stop_actor, \
    unschedulable
from yarn_vllm.tools.redact import redact_kwargs


def run_config(config: dict) -> dict:
    """The real work of one configuration: one engine timing every (context, batch) case."""
    from yarn_vllm.tools.bench.engine import run_bench_engine
    from yarn_vllm.tools.bench.offline import method_spec
    from yarn_vllm.tools.methods import checked_factor, hf_config_of
    from yarn_vllm.tools.models import resolve_model

    model = resolve_model(config["model"])
    hf = hf_config_of(model)
    factor = checked_factor(hf, max(config["context_lengths"]) + config["output_tokens"],
                          config["factor"])
    spec, plugins = method_spec(model, config["method"], hf, contexts=config["context_lengths"],
                                batches=config["batch_sizes"],
                                output_tokens=config["output_tokens"], factor=factor,
                                repeats=config["repeats"], llm_kwargs=config["llm_kwargs"])

    def progress(row):  # printed in the actor; Ray forwards it to the driver's console
        print(f"{config['method']} ctx {row['context']} batch {row['batch']}: prefill "
              f"{row['prefill_tok_s']:.1f} tok/s, decode {row['decode_tok_s'] or 0:.1f} tok/s",
              flush=True)

    out = run_bench_engine(spec, plugins=plugins, on_progress=progress)
    return {"factor": factor, "rotary_classes": out["rotary_classes"], "dtype": out["dtype"],
            "engine_start_s": out["engine_start_s"], "rows": out["results"]}


class _Worker:
    """The Ray actor: one per configuration attempt, so every engine gets a fresh process."""

    def node(self, model: str | None, version: str) -> dict:
        return check_node(model, version)

    def run(self, work, config: dict):
        return work(config)


def read_results(path: str) -> dict:
    """{config id: record} from a sweep's JSONL (the last record per id wins).

    Lines that are not a record (cut short by a crash, or JSON but not an object with
    a string id) are skipped: their configurations run again.
    """
    records = {}
    if os.path.exists(path):
        with open(path, errors="replace") as f:
            for line in f:
                try:
                    rec = json.loads(line)
                except ValueError:
                    continue
                if isinstance(rec, dict) and isinstance(rec.get("id"), str):
                    records[rec["id"]] = rec
    return records


def _append(path: str, record: dict) -> None:
    """One JSON line at the end of `path`, on a line of its own, under an exclusive lock."""
    line = (json.dumps(record) + "\n").encode()
    with open(path, "ab+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)  # released when the file closes
        end = f.seek(0, os.SEEK_END)
        if end:
            f.seek(end - 1)
            if f.read(1) != b"\n":  # a line torn by a crash: close it first
                line = b"\n" + line
        f.write(line)
        f.flush()
        os.fsync(f.fileno())


class Claims:
    """The configurations this sweep is running: an flock on <output>.locks/<id> each.

    A second sweep on the same output cannot take a claim that is held, so it never
    runs what the first is running. The kernel drops a lock when its holder dies, so
    a killed sweep blocks nothing. The (empty) lock files stay: deleting one while
    another sweep waits to open it would let two sweeps hold "the same" claim.
    """

    def __init__(self, output: str):
        self.dir = os.path.abspath(output) + ".locks"
        os.makedirs(self.dir, exist_ok=True)
        self.held = {}

    def take(self, cid: str) -> bool:
        f = open(os.path.join(self.dir, cid), "a")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.close()
            return False
        self.held[cid] = f
        return True

    def release(self, cid: str) -> None:
        f = self.held.pop(cid, None)
        if f is not None:
            f.close()

    def release_all(self) -> None:
        for cid in list(self.held):
            self.release(cid)


def _label(config: dict) -> str:
    if not {"method", "context_lengths", "batch_sizes"} <= set(config):
        return json.dumps(config, sort_keys=True)[:80]
    return (f"{config['method']} ctx {','.join(map(str, config['context_lengths']))} "
            f"batch {','.join(map(str, config['batch_sizes']))}")


def run_sweep(configs: list[dict], output: str, *, num_cpus: float = 2, timeout_s: float = 1800,
              retries: int = 1, resources: dict | None = None, work=run_config, log=print,
              poll_s: float = 0.5) -> dict:
    """Run every configuration not yet recorded as ok in `output`; returns
    {"ok": [records], "failed": [records], "skipped": [ids already done],
     "busy": [ids another sweep on `output` was running], "ran": n}.

    Uses the Ray cluster this process is connected to, or starts a local one. `resources`:
    custom Ray resources every configuration's actor asks for (e.g. a node's own).
    """
    import ray

    connect(log_to_driver=True)
    cluster_cpus = ray.cluster_resources().get("CPU", 0)
    if num_cpus > cluster_cpus:
        raise ValueError(f"num_cpus {num_cpus} per configuration is more than the Ray cluster's "
                         f"{cluster_cpus:g} CPUs; lower num_cpus in the sweep file")
    parallel = max(1, int(cluster_cpus // num_cpus))
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    done = {i for i, r in read_results(output).items() if r.get("status") == "ok"}
    todo = deque((config_id(c), c, 1) for c in configs if config_id(c) not in done)
    report = {"ok": [], "failed": [], "skipped": [config_id(c) for c in configs
                                                  if config_id(c) in done], "busy": []}
    log(f"sweep: {len(configs)} configurations, {len(report['skipped'])} already done in "
        f"{output}, running {len(todo)} ({parallel} at a time, {num_cpus:g} CPUs each, "
        f"timeout {timeout_s:g} s, {retries} retr{'y' if retries == 1 else 'ies'} per dead worker)")
    claims = Claims(output)
    try:
        _drive(todo, report, claims, output, parallel=parallel, num_cpus=num_cpus,
               timeout_s=timeout_s, retries=retries, resources=resources, work=work, log=log,
               poll_s=poll_s)
    finally:
        claims.release_all()
    failed = report["failed"]
    log(f"sweep: {len(report['ok'])} ok, {len(failed)} failed, {len(report['skipped'])} skipped "
        f"(already done)" + (f", {len(report['busy'])} left to another sweep on {output}"
                             if report["busy"] else "")
        + "".join(f"\n  FAILED {r['id']} {_label(r['config'])}: {r['error']}" for r in failed))
    report["ran"] = len(report["ok"]) + len(failed)
    return report


def _drive(todo: deque, report: dict, claims: Claims, output: str, *, parallel: int,
           num_cpus: float, timeout_s: float, retries: int, resources: dict | None, work, log,
           poll_s: float) -> None:
    """run_sweep's loop: claim, start, collect and record each configuration in `todo`."""
    import ray
    from ray.exceptions import GetTimeoutError, RayActorError, RayTaskError, WorkerCrashedError

    gpus, version = cluster_has_gpus(), plugin_version()
    running = {}  # ObjectRef -> Job
    total = len(todo)

    def record(job, status, result=None, error=None):
        config = job.config
        if isinstance(config.get("llm_kwargs"), dict):  # e.g. an hf_token: not into results
            config = {**config, "llm_kwargs": redact_kwargs(config["llm_kwargs"])}
        error = error or {}
        rec = {"id": job.cid, "config": config, "status": status, "attempts": job.attempt,
               "seconds": round(job.deadline.elapsed(), 3), "node": job.node,
               "result": result, "error": error.get("error"),
               "error_chain": error.get("error_chain"),
               "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        _append(output, rec)
        claims.release(job.cid)  # recorded first: a sweep that claims it next sees the record
        report["ok" if status == "ok" else "failed"].append(rec)
        finished = len(report["ok"]) + len(report["failed"])
        log(f"[{finished}/{total}] {job.cid} {_label(config)}: {status} after "
            f"{rec['seconds']:.1f} s" + (f" on {job.node}" if job.node else "")
            + (f" ({rec['error']})" if rec["error"] else ""))

    def claim(cid, config) -> bool:
        if not claims.take(cid):
            report["busy"].append(cid)
            log(f"  {cid} {_label(config)}: another sweep on {output} is running it; left to it")
            return False
        if read_results(output).get(cid, {}).get("status") == "ok":  # done since we looked
            claims.release(cid)
            report["skipped"].append(cid)
            return False
        return True

    while todo or running:
        while todo and len(running) < parallel:
            cid, config, attempt = todo.popleft()
            if attempt == 1 and not claim(cid, config):  # a retry holds its claim already
                continue
            request = engine_resources(config.get("llm_kwargs") or {}, num_cpus=num_cpus,
                                       gpus=gpus, resources=resources, engine_in_actor=False)
            actor, group = start_actor(_Worker, request, max_restarts=0, max_task_retries=0)
            job = _Job(cid, config, attempt, actor, group, request, Deadline(timeout_s))
            # first the node check (the actor is up, its node has what the work needs), then
            # the work; timeout_s counts from here, so a worker that is never scheduled ends
            model = config.get("model")
            running[actor.node.remote(model and local_path(model), version)] = job
        if not running:
            break
        ready, _ = ray.wait(list(running), num_returns=1, timeout=poll_s)
        for ref in ready:
            job = running.pop(ref)
            try:
                result = ray.get(ref)
                if job.node is None:  # the actor is up and its node fit: hand it the work
                    job.node = result["node"]
                    work_config = config_with(job.config, job.request["llm_kwargs"])
                    running[job.actor.run.remote(work, work_config)] = job
                    log(f"  start {job.cid} {_label(job.config)} (attempt {job.attempt}, "
                        f"{job.node}, pid {result['pid']})")
                    continue
            except (RayActorError, WorkerCrashedError) as e:
                if job.attempt <= retries:
                    log(f"  {job.cid} {_label(job.config)}: worker died ({type(e).__name__}); "
                        f"retrying on a fresh worker")
                    todo.appendleft((job.cid, job.config, job.attempt + 1))
                else:
                    err = failure(e)
                    err["error"] = (f"worker died on each of {job.attempt} attempts: "
                                    f"{err['error']}")
                    record(job, "failed", error=err)
            except (RayTaskError, GetTimeoutError) as e:
                record(job, "failed", error=failure(e))
            else:
                record(job, "ok", result=result)
            stop_actor(job.actor, job.group)
        for ref, job in list(running.items()):
            if job.deadline.left() <= 0:
                del running[ref]
                stop_actor(job.actor, job.group)
                why = (unschedulable(job.request, job.deadline.elapsed(), timeout_s)
                       if job.node is None else
                       f"timed out after {timeout_s:g} s (timeout_s, from submission)")
                record(job, "failed", error={"error": why, "error_chain": [why]})


class _Job:
    """One configuration attempt in flight: its actor, where it runs, its deadline."""

    def __init__(self, cid, config, attempt, actor, group, request, deadline):
        self.cid, self.config, self.attempt = cid, config, attempt
        self.actor, self.group, self.request, self.deadline = actor, group, request, deadline
        self.node = None  # set once the actor has checked its node


def config_with(config: dict, llm_kwargs: dict) -> dict:
    """`config` with engine arguments its placement implies (e.g. the executor) added."""
    if not llm_kwargs:
        return config
    return {**config, "llm_kwargs": {**(config.get("llm_kwargs") or {}), **llm_kwargs}}


def write_summary(output: str, log=print) -> None:
    """CSV and PNG of every ok record in the sweep's JSONL, beside it."""
    from yarn_vllm.tools.bench.report import markdown_table, plot, write_csv

    rows = []
    for rec in read_results(output).values():
        if rec.get("status") == "ok":
            for row in rec["result"]["rows"]:
                rows.append({**row, "config_id": rec["id"]})
    if not rows:
        return
    stem = os.path.splitext(output)[0]
    write_csv(rows, stem + ".csv")
    plot(rows, stem + ".png", os.path.basename(stem))
    log(markdown_table(rows, "prefill_tok_s"))
    log(f"wrote {stem}.csv, {stem}.png")
