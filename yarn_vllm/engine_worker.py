"""Run one vLLM engine in a fresh process and return what it produced.

Evaluations compare methods that need different engine settings, and tests
compare the plugin on and off; each engine therefore gets its own process
(its own environment and plugin registry), started by `run_engine`.

Spec (JSON): {"model", "llm_kwargs": {...}, "prompts": [[token ids]],
              "sampling": {"max_tokens", "logprobs", "prompt_logprobs", ...}}
Result: {"rotary_classes", "attention_backends", "prefix_caching", "chunked_prefill",
         "generate_seconds",
         "outputs": [{"token_ids", "text", "logprobs", "prompt_logprobs"}]}
where logprobs are lists (per step) of {token_id: logprob}.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time

_ENV_DEFAULTS = {"TOKENIZERS_PARALLELISM": "false",
                 # lets LLM.apply_model ship yarn_vllm.introspect functions to the worker
                 "VLLM_ALLOW_INSECURE_SERIALIZATION": "1"}


def apply_cpu_defaults(kwargs: dict) -> None:
    """Offline-job defaults for vLLM's CPU backend, each measured here and overridable.

    - VLLM_CPU_KVCACHE_SPACE=4 (GiB): the default fraction of node memory fails on small machines.
    - VLLM_CPU_NUM_OF_RESERVED_CPU=0: an offline job has no API server to keep a core for;
      on 2 cores an 8k prefill ran in 66 s with both, several times longer with one.
    - enforce_eager: CPU graph compilation took over 2 minutes at start-up.
    - dtype float32 where the CPU has no native bf16 (bf16 prefill was ~3x slower there).
    """
    import torch

    if torch.cuda.is_available():
        return
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "4")
    os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")
    kwargs.setdefault("enforce_eager", True)
    if "dtype" not in kwargs and cpu_lacks_bf16():
        kwargs["dtype"] = "float32"


def cpu_lacks_bf16() -> bool:
    """True on a CPU-only machine whose CPU has no native bf16 (no AVX512-BF16 or AMX)."""
    import torch

    if torch.cuda.is_available():
        return False
    try:
        flags = open("/proc/cpuinfo").read()
    except OSError:
        return False
    return "avx512_bf16" not in flags and "amx_bf16" not in flags


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


def run_engine(spec: dict, *, plugins: bool = True, timeout: float = 3600,
               env: dict | None = None) -> dict:
    """Run `spec` in a fresh process; plugins=False sets VLLM_PLUGINS="" (vLLM's own layers)."""
    spec = dict(spec, llm_kwargs=dict(spec.get("llm_kwargs", {})))
    apply_cpu_defaults(spec["llm_kwargs"])
    child_env = engine_env(plugins, env)
    with tempfile.TemporaryDirectory(prefix="yarn_vllm_engine_") as tmp:
        spec_path, out_path = os.path.join(tmp, "spec.json"), os.path.join(tmp, "out.json")
        with open(spec_path, "w") as f:
            json.dump(spec, f)
        # Its own session, so that a timeout takes vLLM's EngineCore and workers down too.
        proc = subprocess.Popen([sys.executable, "-m", "yarn_vllm.engine_worker", spec_path,
                                 out_path], env=child_env, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, start_new_session=True)
        try:
            stdout, stderr = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
            raise
        if proc.returncode != 0:
            # vLLM logs (the engine core's ERROR lines included) to stdout, tracebacks to stderr
            raise RuntimeError(f"vLLM engine process failed (exit {proc.returncode}):\n"
                               f"{_error_excerpt(stderr)}\n--- vLLM's log (stdout) ---\n"
                               f"{_error_excerpt(stdout or '', 3000)}")
        with open(out_path) as f:
            return json.load(f)


def _error_excerpt(stderr: str, limit: int = 4000) -> str:
    """The tail of stderr, and first the opening traceback when the tail does not hold it:
    vLLM's engine core prints the root cause first, the client only EngineDeadError last."""
    first = stderr.find("Traceback (most recent call last)")
    if first < 0 or first >= len(stderr) - limit:
        return stderr[-limit:]
    return stderr[first:first + limit] + "\n[...]\n" + stderr[-limit // 2:]


def _steps(steps) -> list:
    return [None if step is None else {str(t): lp.logprob for t, lp in step.items()}
            for step in (steps or [])]


def main(spec_path: str, out_path: str) -> None:
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    from yarn_vllm.introspect import attention_backend_classes, rotary_layer_classes

    with open(spec_path) as f:
        spec = json.load(f)
    kwargs = {"seed": 0, **spec.get("llm_kwargs", {})}
    llm = LLM(model=spec["model"], **kwargs)
    sampling = {"temperature": 0.0, "ignore_eos": True, **spec.get("sampling", {})}
    params = SamplingParams(**sampling)
    prompts = [TokensPrompt(prompt_token_ids=ids) for ids in spec["prompts"]]
    t0 = time.perf_counter()
    results = llm.generate(prompts, params, use_tqdm=spec.get("progress", False))
    seconds = time.perf_counter() - t0
    config = llm.llm_engine.vllm_config
    out = {"rotary_classes": llm.apply_model(rotary_layer_classes)[0],
           "attention_backends": llm.apply_model(attention_backend_classes)[0],
           "prefix_caching": bool(config.cache_config.enable_prefix_caching),
           "chunked_prefill": bool(config.scheduler_config.enable_chunked_prefill),
           "generate_seconds": seconds, "outputs": []}
    for r in results:
        c = r.outputs[0]
        out["outputs"].append({"token_ids": list(c.token_ids), "text": c.text,
                               "logprobs": _steps(c.logprobs),
                               "prompt_logprobs": _steps(r.prompt_logprobs)})
    with open(out_path, "w") as f:
        json.dump(out, f)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
