"""Run one vLLM engine in a fresh process and return what it produced.

Evaluations compare methods that need different engine settings, benchmarks time each
method with its own engine, and tests compare the plugin on and off; each engine
therefore gets its own process (its own environment and plugin registry).
`run_worker` is the one way such a process is started; `run_engine` runs this
module's worker, which generates:

Spec (JSON): {"model", "llm_kwargs": {...}, "prompts": [PROMPT],
              "sampling": {"max_tokens", "logprobs", "prompt_logprobs", ...},
              "batches": [[PROMPT]] (optional: run after "prompts", one generate call each),
              "introspect": bool (optional, default true: see below)}
where a PROMPT is a list of token ids, or {"prompt_token_ids": [...], "sampling": {...},
"cache_salt": str} whose sampling keys (e.g. "extra_args") override the spec's for that
request ("max_tokens": null makes it open-ended, as a chat client that sends none).
Result: {"rotary_classes", "attention_backends", "prefix_caching", "chunked_prefill",
         "dtype", "generate_seconds", "num_preemptions", "escalations", "preemptions",
         "outputs": [{"token_ids", "text", "logprobs", "prompt_logprobs",
                      "num_cached_tokens", "scale"}]}  (every batch's outputs, in order)
where logprobs are lists (per step) of {token_id: logprob}, dtype is the one the
engine really ran in (e.g. "bfloat16") and num_preemptions vLLM's counter (None
where the engine keeps no stats). rotary_classes and attention_backends come from
LLM.apply_model, which pickles a function to the engine core: only a spec that asks
for them ("introspect", the default) runs with VLLM_ALLOW_INSECURE_SERIALIZATION=1;
with "introspect": false both are None and the engine keeps vLLM's safe default. With the engine core in the worker's process
(ENGINE_IN_PROCESS) and a per-sequence YaRN mode, "escalations" and "preemptions" list what
yarn-vllm's scheduler did (vllm_seam.scheduler; request ids are each output's index), and
each output's "scale" is the one its last token was produced at; otherwise they are None.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time

from yarn_vllm.tools.engine_args import engine_setup

_ENV_DEFAULTS = {"TOKENIZERS_PARALLELISM": "false"}
# lets LLM.apply_model ship yarn_vllm.vllm_seam.introspect functions to the engine core; only for
# engines asked to introspect (see the module docstring)
INTROSPECTION_ENV = {"VLLM_ALLOW_INSECURE_SERIALIZATION": "1"}
PROGRESS = "PROGRESS "  # a worker's stdout line carrying one JSON progress record
PARENT_PID = "YARN_VLLM_PARENT_PID"  # who started a worker (see exit_with_parent)
# The engine core in the worker's own process: no second process that imports vLLM again
# (about 13 s of a 20 s tiny-model start here), and steps run without IPC in between.
ENGINE_IN_PROCESS = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0"}


def engine_env(plugins: bool, extra: dict | None = None) -> dict:
    """An engine process's environment: ours by default, then `extra`, then the plugin switch
    (plugins=False sets VLLM_PLUGINS="", so vLLM's own layers serve)."""
    env = dict(os.environ)
    for key, value in _ENV_DEFAULTS.items():
        env.setdefault(key, value)
    env.update(extra or {})
    if plugins:
        env.pop("VLLM_PLUGINS", None)
    else:
        env["VLLM_PLUGINS"] = ""
    return env


def run_worker(module: str, spec: dict, *, plugins: bool = True, env: dict | None = None,
               timeout: float | None = None, on_progress=None) -> dict:
    """Run `python -m module SPEC OUT` in a fresh process and return OUT's JSON.

    The spec's llm_kwargs and the process's environment come from yarn_vllm.tools.engine_args
    (CPU defaults, a core group per rank); plugins=False sets VLLM_PLUGINS="".
    The process leads its own process group, so a timeout kills vLLM's engine core and
    workers with it; the worker calls `exit_with_parent()`, so it dies with us as well.
    Stdout lines starting with PROGRESS go to `on_progress` as parsed JSON.
    Raises TimeoutError after `timeout` seconds, RuntimeError (with the log) on failure.
    """
    child_env = {**engine_env(plugins, env), PARENT_PID: str(os.getpid())}
    setup = engine_setup(spec.get("llm_kwargs", {}), env=child_env)
    setup.apply_env(child_env)
    spec = dict(spec, llm_kwargs=setup.kwargs)
    with tempfile.TemporaryDirectory(prefix="yarn_vllm_engine_") as tmp:
        spec_path, out_path = os.path.join(tmp, "spec.json"), os.path.join(tmp, "out.json")
        with open(spec_path, "w") as f:
            json.dump(spec, f)
        stdout_lines = []
        with open(os.path.join(tmp, "stderr.log"), "w+") as stderr:
            proc = subprocess.Popen([sys.executable, "-m", module, spec_path, out_path],
                                    env=child_env, stdout=subprocess.PIPE,
                                    stderr=stderr, text=True, start_new_session=True)
            timed_out = threading.Event()

            def kill():
                timed_out.set()
                _kill_group(proc)

            timer = threading.Timer(timeout, kill) if timeout else None
            if timer:
                timer.daemon = True
                timer.start()
            try:
                for line in proc.stdout:  # vLLM logs to stdout too: those lines are kept
                    if line.startswith(PROGRESS):
                        if on_progress:
                            on_progress(json.loads(line[len(PROGRESS):]))
                    else:
                        stdout_lines.append(line)
                code = proc.wait()
            finally:
                if timer:
                    timer.cancel()
                if proc.poll() is None:
                    _kill_group(proc)
            stderr.seek(0)
            err = stderr.read()
        if timed_out.is_set():
            raise TimeoutError(f"{module} ({spec.get('method', spec['model'])}) timed out "
                               f"after {timeout:.0f} s")
        if code != 0:
            # vLLM logs (the engine core's ERROR lines included) to stdout, tracebacks to stderr
            raise RuntimeError(f"{module} failed (exit {code}):\n{_error_excerpt(err)}\n"
                               f"--- vLLM's log (stdout) ---\n"
                               f"{_error_excerpt(''.join(stdout_lines), 3000)}")
        with open(out_path) as f:
            return json.load(f)


def run_engine(spec: dict, *, plugins: bool = True, timeout: float = 3600,
               env: dict | None = None, in_process: bool = False) -> dict:
    """Generate `spec` in a fresh process (see the module docstring). in_process=True runs
    the engine core in that process too (ENGINE_IN_PROCESS) rather than in vLLM's own."""
    if in_process:
        env = {**ENGINE_IN_PROCESS, **(env or {})}
    if spec.get("introspect", True):
        env = {**INTROSPECTION_ENV, **(env or {})}
    return run_worker("yarn_vllm.tools.engine_worker", spec, plugins=plugins, env=env,
                      timeout=timeout)


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # pgid == pid: start_new_session
    except ProcessLookupError:
        pass


def _error_excerpt(stderr: str, limit: int = 4000) -> str:
    """The tail of stderr, and first the opening traceback when the tail does not hold it:
    vLLM's engine core prints the root cause first, the client only EngineDeadError last."""
    first = stderr.find("Traceback (most recent call last)")
    if first < 0 or first >= len(stderr) - limit:
        return stderr[-limit:]
    return stderr[first:first + limit] + "\n[...]\n" + stderr[-limit // 2:]


def exit_with_parent(poll_s: float = 1.0) -> None:
    """In a worker: a daemon thread that kills this process group once our parent is gone.

    A watchdog rather than preexec_fn/PR_SET_PDEATHSIG: preexec_fn can deadlock in a
    multithreaded parent (a Ray actor), and PDEATHSIG fires when the parent *thread* ends.
    The parent's pid comes from run_worker (YARN_VLLM_PARENT_PID), so a parent that died
    before this call is noticed too.
    """
    parent = int(os.environ.get(PARENT_PID) or os.getppid())

    def watch():
        while os.getppid() == parent:
            time.sleep(poll_s)
        if os.getpgrp() == os.getpid():  # our own group (run_worker): the engine's too
            os.killpg(os.getpgrp(), signal.SIGKILL)
        os._exit(1)

    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()


def engine_dtype(llm) -> str:
    """The dtype `llm` really runs in, e.g. "bfloat16" (vLLM resolves "auto" from the model)."""
    return str(llm.llm_engine.vllm_config.model_config.dtype).removeprefix("torch.")


def metric_counter(llm, name: str) -> int | None:
    """A counter of vLLM's metrics (needs disable_log_stats=False), or None."""
    try:
        metrics = llm.get_metrics()
    except Exception:  # noqa: BLE001 - stats off: the engine keeps no metrics
        return None
    return next((int(m.value) for m in metrics if m.name == name), None)


def logprob_steps(steps) -> list:
    return [None if step is None else {str(t): lp.logprob for t, lp in step.items()}
            for step in (steps or [])]


def scheduler_record(llm, index: dict[str, int]) -> dict:
    """yarn-vllm's escalations and preemptions in an in-process engine core, with request ids
    replaced by `index[id]` (their output's position); None for each otherwise."""
    import dataclasses

    from yarn_vllm.vllm_seam.introspect import engine_scheduler
    from yarn_vllm.vllm_seam.scheduler import (escalations_of, external_request_id,
                                               preemptions_of)

    scheduler = engine_scheduler(llm)
    escalations, preemptions = escalations_of(scheduler), preemptions_of(scheduler)
    if escalations is None:
        return {"escalations": None, "preemptions": None}

    def indexed(records):
        return [dict(dataclasses.asdict(r), request_id=index.get(external_request_id(r.request_id)))
                for r in records]

    return {"escalations": indexed(escalations), "preemptions": indexed(preemptions)}


def escalation_counts(record: dict) -> dict:
    """From a scheduler_record: how many escalations request mode made, and the tokens it
    recomputed for them (None where the engine did not say: no per-sequence mode, or its
    core in another process)."""
    escalations = record.get("escalations")
    if escalations is None:
        return {"escalations": None, "recomputed_tokens": None}
    return {"escalations": len(escalations),
            "recomputed_tokens": sum(e["recomputed"] for e in escalations)}


def main(spec_path: str, out_path: str) -> None:
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    from yarn_vllm.vllm_seam.introspect import (attention_backend_classes, engine_scheduler,
                                                rotary_layer_classes)
    from yarn_vllm.vllm_seam.scheduler import finished_scale_of

    exit_with_parent()
    with open(spec_path) as f:
        spec = json.load(f)
    kwargs = {"seed": 0, **spec.get("llm_kwargs", {})}
    llm = LLM(model=spec["model"], **kwargs)
    sampling = {"temperature": 0.0, "ignore_eos": True, **spec.get("sampling", {})}
    batches = [spec["prompts"], *spec.get("batches", [])]
    t0 = time.perf_counter()
    results = []
    for batch in batches:
        prompts = [TokensPrompt(prompt_token_ids=p) if isinstance(p, list) else TokensPrompt(
            prompt_token_ids=p["prompt_token_ids"],
            **({"cache_salt": p["cache_salt"]} if "cache_salt" in p else {})) for p in batch]
        params = [SamplingParams(**{**sampling, **({} if isinstance(p, list)
                                                   else p.get("sampling", {}))}) for p in batch]
        results += llm.generate(prompts, params, use_tqdm=spec.get("progress", False))
    seconds = time.perf_counter() - t0
    config = llm.llm_engine.vllm_config
    introspect = spec.get("introspect", True)
    out = {"rotary_classes": llm.apply_model(rotary_layer_classes)[0] if introspect else None,
           "attention_backends": (llm.apply_model(attention_backend_classes)[0]
                                  if introspect else None),
           "prefix_caching": bool(config.cache_config.enable_prefix_caching),
           "chunked_prefill": bool(config.scheduler_config.enable_chunked_prefill),
           "dtype": engine_dtype(llm), "generate_seconds": seconds,
           "num_preemptions": metric_counter(llm, "vllm:num_preemptions"), "outputs": []}
    index = {r.request_id: i for i, r in enumerate(results)}
    out.update(scheduler_record(llm, index))
    scheduler = engine_scheduler(llm)
    for r in results:
        c = r.outputs[0]
        out["outputs"].append({"token_ids": list(c.token_ids), "text": c.text,
                               "logprobs": logprob_steps(c.logprobs),
                               "prompt_logprobs": logprob_steps(r.prompt_logprobs),
                               "num_cached_tokens": r.num_cached_tokens,
                               "scale": finished_scale_of(scheduler, r.request_id)})
    with open(out_path, "w") as f:
        json.dump(out, f)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
