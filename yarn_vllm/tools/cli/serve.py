"""`yarn-vllm serve`: the launcher of vLLM's OpenAI-compatible server with YaRN.

`serve_command(...)` checks the YaRN settings and the flags that cannot work on this
platform *before* any engine starts, and returns the argv and environment of the
server (`python -m yarn_vllm.tools.openai_server`, see there). Every flag it does not own passes
through to vLLM unchanged; the user's `--hf-overrides` is merged into ours
(yarn_vllm.tools.overrides).

Private by default: the server binds 127.0.0.1 unless `--host` (or `--uds`) is given,
where vLLM would bind every interface; `run` prints where it listens, warns when that
is beyond loopback (without a key: anyone can use it; with one: the routes the key does
not guard), and prints the command with every secret (yarn_vllm.tools.redact) hidden.
An `--api-key` leaves the command line for the server's environment (VLLM_API_KEY).
"""

from __future__ import annotations

import ipaddress
import json
import os
import sys

from yarn_vllm.tools.cli.args import add_model_flag, add_yarn_flags, yarn_config_from_args, \
    yarn_flags_given
from yarn_vllm.errors import UserError
from yarn_vllm.tools.engine_args import check_plugin_installed, engine_setup
from yarn_vllm.tools.redact import redact_argv
from yarn_vllm.yarn.config import YarnConfig

SERVER_MODULE = "yarn_vllm.tools.openai_server"
LOOPBACK = "127.0.0.1"
VLLM_DEFAULT_PORT = "8000"
# What vLLM 0.32's API key does not guard: its check covers only paths under /v1, /v2,
# /inference and /cohere (GUARDED_PREFIX, vllm/entrypoints/serve/middleware/authenticate.py).
# These are the other routes its server has for a generative model, less the docs pages,
# /health and /ping; tests/test_serve_command.py reads them off vLLM's own app.
UNGUARDED_ROUTES = ("/invocations", "/generative_scoring", "/tokenize", "/detokenize",
                    "/metrics", "/load", "/version", "/kv_event_sources", "/scale_elastic_ep",
                    "/is_scaling_elastic_ep")
# engine argument -> every server flag that sets it
_SPELLINGS = {"enforce_eager": ("--enforce-eager", "--no-enforce-eager"),
              "compilation_config": ("--compilation-config", "-cc"), "dtype": ("--dtype",),
              "tensor_parallel_size": ("--tensor-parallel-size", "-tp"),
              "pipeline_parallel_size": ("--pipeline-parallel-size", "-pp"),
              "distributed_executor_backend": ("--distributed-executor-backend",),
              "max_model_len": ("--max-model-len",), "hf_overrides": ("--hf-overrides",)}
_INTEGERS = ("tensor_parallel_size", "pipeline_parallel_size", "max_model_len")


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


def without_flag(argv: list[str], *names: str) -> list[str]:
    """`argv` less every `--name value`, `--name=value` and `--name` (a switch) of `names`."""
    out, dropping = [], False
    for arg in argv:
        flag = arg.startswith("--") or (arg.startswith("-") and arg[1:2].isalpha())
        if dropping and not flag:  # the value of a dropped flag
            dropping = False
            continue
        dropping = flag and _normal(arg) in names and "=" not in arg
        if not (flag and _normal(arg) in names):
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


# ---- the command ---------------------------------------------------------------

def argv_settings(argv: list[str]) -> dict:
    """The engine arguments among `argv` that the builder reads: {name: value}.

    hf_overrides arrives parsed, sizes and lengths as integers, a flag's presence as its
    value (`--no-enforce-eager` is a choice of enforce_eager too).
    """
    out = {}
    for name, spellings in _SPELLINGS.items():
        if not has_flag(argv, *spellings):
            continue
        if name in _INTEGERS:
            out[name] = _int_flag(argv, *spellings)
        elif name == "hf_overrides":
            text = flag_value(argv, *spellings)
            try:
                out[name] = json.loads(text)
            except (TypeError, json.JSONDecodeError):
                raise UserError("--hf-overrides", f"is not JSON: {str(text)[:60]!r}",
                                "pass a JSON object, e.g. "
                                "'{\"max_position_embeddings\": 16384}'", source="serve") from None
        else:
            out[name] = flag_value(argv, *spellings) or True
    return out


def _as_flags(name: str, value) -> list[str]:
    flag = "--" + name.replace("_", "-")
    if value is True:
        return [flag]
    return [flag, json.dumps(value) if isinstance(value, dict) else str(value)]


def take_api_key(argv: list[str], env: dict) -> list[str]:
    """`argv` less `--api-key KEY`, the key moved to env's VLLM_API_KEY, where vLLM reads it
    too (vllm/entrypoints/serve/middleware/register.py): a command line is readable by every
    local user in `ps` and /proc/<pid>/cmdline, a process's environment only by its owner."""
    out, keys, taking = [], [], False
    for arg in argv:
        if arg.startswith("-") and len(arg) > 1:
            taking = _normal(arg) == "--api-key"
            if taking:
                if "=" in arg:
                    keys.append(arg.split("=", 1)[1])
                    taking = False
                continue
        elif taking:
            keys.append(arg)
            continue
        out.append(arg)
    if len(keys) > 1:
        raise UserError("--api-key", f"has {len(keys)} keys; vLLM takes one from its "
                        "environment (VLLM_API_KEY)", "give one key", source="serve")
    if keys:
        env["VLLM_API_KEY"] = keys[0]
    return out


def serve_command(model: str, yarn: YarnConfig | None, passthrough: list[str], *,
                  flags: dict | None = None, cpu: bool | None = None,
                  env: dict | None = None) -> tuple[list[str], dict]:
    """(argv, env) of the server for `model` with `yarn` (None: as the model's config says).

    `flags`: the YaRN flags given on the command line (yarn_vllm.tools.cli.args.yarn_flags_given).
    The engine arguments come from yarn_vllm.tools.engine_args, as for every other engine;
    what it adds or changes replaces the user's flag for it. Raises UserError, naming the
    field or flag, before any engine starts.
    """
    env = dict(os.environ if env is None else env)
    argv = take_api_key(list(passthrough), env)
    check_plugin_installed(env)
    user = argv_settings(argv)
    hf = None
    if yarn is not None:
        from transformers import AutoConfig

        hf = AutoConfig.from_pretrained(model).to_dict()
    setup = engine_setup(user, hf_config=hf, yarn=yarn, flags=flags, server=True, cpu=cpu,
                         env=env, source="serve")
    setup.apply_env(env)
    for name, value in setup.kwargs.items():
        if name not in user or user[name] != value:
            argv = _as_flags(name, value) + without_flag(argv, *_SPELLINGS.get(
                name, ("--" + name.replace("_", "-"),)))
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
    if is_loopback(host):
        return out, []
    where = host or "every interface"
    if not has_flag(cmd, "--api-key") and not env.get("VLLM_API_KEY"):
        return out, [f"yarn-vllm serve: warning: {where} is beyond loopback and there is no "
                     "API key, so anyone who can reach this machine can use the server. Fix: "
                     "set VLLM_API_KEY (or pass --api-key KEY), or drop --host to listen on "
                     f"{LOOPBACK} only"]
    return out, [f"yarn-vllm serve: warning: {where} is beyond loopback, and vLLM's API key "
                 f"guards only /v1, /v2, /inference and /cohere: {', '.join(UNGUARDED_ROUTES)} "
                 "answer anyone who can reach this machine (/invocations runs completions and "
                 "chat, /generative_scoring the model). Fix: expose only /v1 through a proxy, "
                 f"or drop --host to listen on {LOOPBACK} only"]


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
