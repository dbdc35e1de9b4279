"""`yarn-vllm bench sweep sweep.yaml`: a grid of benchmark engines as Ray work.

Each configuration runs in its own Ray actor (a fresh worker process declaring `num_cpus`),
whose engine is in turn its own process (yarn_vllm.tools.bench.engine). As many configurations run
at once as the cluster's CPUs allow. Each result is appended to the JSONL file the moment it
arrives, so a rerun skips every configuration already recorded as ok. A worker that dies is
retried `retries` times on a fresh actor, then recorded as failed; a configuration past
`timeout_s` has its actor killed and is recorded as failed; the sweep always finishes the rest.

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
from yarn_vllm.tools.redact import redact_kwargs


def run_config(config: dict) -> dict:
    """The real work of one configuration: one engine timing every (context, batch) case."""
    from yarn_vllm.tools.bench.engine import run_bench_engine
    from yarn_vllm.tools.bench.offline import bench_factor, hf_config_of, method_spec
    from yarn_vllm.tools.models import resolve_model

    model = resolve_model(config["model"])
    hf = hf_config_of(model)
    factor = bench_factor(hf, config["context_lengths"], config["output_tokens"],
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

    def pid(self) -> int:
        return os.getpid()

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
              retries: int = 1, work=run_config, log=print, poll_s: float = 0.5) -> dict:
    """Run every configuration not yet recorded as ok in `output`; returns
    {"ok": [records], "failed": [records], "skipped": [ids already done],
     "busy": [ids another sweep on `output` was running], "ran": n}.

    Uses the Ray cluster this process is connected to, or starts a local one.
    """
    import ray

    if not ray.is_initialized():
        ray.init(include_dashboard=False, log_to_driver=True)
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
               timeout_s=timeout_s, retries=retries, work=work, log=log, poll_s=poll_s)
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
           num_cpus: float, timeout_s: float, retries: int, work, log, poll_s: float) -> None:
    """run_sweep's loop: claim, start, collect and record each configuration in `todo`."""
    import ray
    from ray.exceptions import GetTimeoutError, RayActorError, RayTaskError, WorkerCrashedError

    worker_cls = ray.remote(_Worker)
    running = {}  # ObjectRef -> (id, config, attempt, actor, started)
    total = len(todo)

    def record(cid, config, attempt, started, status, result=None, error=None):
        if isinstance(config.get("llm_kwargs"), dict):  # e.g. an hf_token: not into results
            config = {**config, "llm_kwargs": redact_kwargs(config["llm_kwargs"])}
        rec = {"id": cid, "config": config, "status": status, "attempts": attempt,
               "seconds": round(time.time() - (started or time.time()), 3), "result": result,
               "error": error,
               "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        _append(output, rec)
        claims.release(cid)  # recorded first: a sweep that claims it next sees the record
        report["ok" if status == "ok" else "failed"].append(rec)
        finished = len(report["ok"]) + len(report["failed"])
        log(f"[{finished}/{total}] {cid} {_label(config)}: {status} after {rec['seconds']:.1f} s"
            + (f" ({error})" if error else ""))

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
            actor = worker_cls.options(num_cpus=num_cpus, max_restarts=0,
                                       max_task_retries=0).remote()
            # first the actor's pid (its process is up), then the work; the timeout
            # clock starts with the work, so waiting for a worker process does not count
            running[actor.pid.remote()] = (cid, config, attempt, actor, None)
        if not running:
            break
        ready, _ = ray.wait(list(running), num_returns=1, timeout=poll_s)
        for ref in ready:
            cid, config, attempt, actor, started = running.pop(ref)
            try:
                result = ray.get(ref)
                if started is None:  # the actor is up: hand it the work
                    running[actor.run.remote(work, config)] = (cid, config, attempt, actor,
                                                               time.time())
                    log(f"  start {cid} {_label(config)} (attempt {attempt}, pid {result})")
                    continue
            except (RayActorError, WorkerCrashedError) as e:
                if attempt <= retries:
                    log(f"  {cid} {_label(config)}: worker died ({type(e).__name__}); "
                        f"retrying on a fresh worker")
                    todo.appendleft((cid, config, attempt + 1))
                else:
                    record(cid, config, attempt, started, "failed",
                           error=f"worker died on each of {attempt} attempts "
                                 f"({type(e).__name__})")
            except (RayTaskError, GetTimeoutError) as e:
                cause = getattr(e, "cause", None) or e
                record(cid, config, attempt, started, "failed",
                       error=f"{type(cause).__name__}: {str(cause).strip().splitlines()[-1]}")
            else:
                record(cid, config, attempt, started, "ok", result=result)
            ray.kill(actor, no_restart=True)
        now = time.time()
        for ref, (cid, config, attempt, actor, started) in list(running.items()):
            if started is not None and now - started > timeout_s:
                del running[ref]
                ray.kill(actor, no_restart=True)
                record(cid, config, attempt, started, "failed",
                       error=f"timed out after {timeout_s:g} s (timeout_s)")


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
