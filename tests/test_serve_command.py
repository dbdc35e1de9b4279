"""`yarn-vllm serve` before any engine starts: the command it builds, and the one-line errors.

Table-driven over the command builder (argv and env in, the server's argv or one line out),
plus the same checks through the real command line. No engine, no server.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from yarn_vllm.tools.cli.serve import UNGUARDED_ROUTES, serve_command
from yarn_vllm.tools.cpu import cpu_thread_binding, on_cpu
from yarn_vllm.yarn.config import YarnConfig
from yarn_vllm.errors import UserError


def run_cli(*args, timeout=600):
    return subprocess.run([sys.executable, "-m", "yarn_vllm.tools.cli", *args], capture_output=True,
                          text=True, timeout=timeout)


@pytest.mark.parametrize("yaml_text, field", [
    ("factor: -2\n", "`factor` is -2.0"),
    ("factr: 2\n", "`factr` is not a YaRN setting"),
    ("factor: [2\n", "is not valid YAML"),
    ("factor: 2\nbeta_fast: 0.5\n", "`beta_fast` is 0.5 with beta_slow 1.0"),
    ("factor: two\n", "`factor` is 'two', not a float"),
])
def test_bad_yarn_config_exits_at_start_in_one_line(tmp_path, yaml_text, field):
    """Refused before any model, engine or vLLM import: one line, exit 2, no traceback."""
    path = tmp_path / "yarn.yaml"
    path.write_text(yaml_text)
    proc = run_cli("serve", str(tmp_path / "never-loaded"), "--yarn-config", str(path),
                   "--port", "1")
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("yarn-vllm: yarn config: "), proc.stderr
    assert field in lines[0]


def test_yarn_setting_the_model_cannot_take_exits_in_one_line(tiny_llama):
    proc = run_cli("serve", tiny_llama, "--target-context", "512")  # trained to 1024
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "yarn-vllm: yarn config: `target_context` (512) is shorter than the original context "
        "(1024). Fix: give a target of at least 1024 tokens"]


@pytest.mark.skipif(not on_cpu(), reason="the Ray executor works on GPU platforms")
def test_ray_executor_on_cpu_is_refused_in_one_line(tiny_llama):
    proc = run_cli("serve", tiny_llama, "--factor", "2", "--tensor-parallel-size", "2",
                   "--distributed-executor-backend", "ray")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "yarn-vllm: serve: `--distributed-executor-backend` is ray, which vLLM's CPU platform "
        "does not support. Fix: use --distributed-executor-backend mp (Ray tensor parallelism "
        "is for GPUs)"]


# ---- what reaches vLLM (no engine) ---------------------------------------------

def test_gpu_platform_passes_tp_and_ray_flags_through(tiny_llama):
    flags = ["--tensor-parallel-size", "2", "--distributed-executor-backend", "ray",
             "--hf-overrides", '{"sliding_window": null}']
    cmd, env = serve_command(tiny_llama, YarnConfig(factor=2.0), flags, cpu=False, env={})
    assert cmd[cmd.index("--tensor-parallel-size") + 1] == "2"
    assert cmd[cmd.index("--distributed-executor-backend") + 1] == "ray"
    assert "--enforce-eager" not in cmd and env == {}  # no CPU defaults on GPU
    overrides = json.loads(cmd[cmd.index("--hf-overrides") + 1])
    assert cmd.count("--hf-overrides") == 1  # the user's keys merged into ours
    hf = json.load(open(os.path.join(tiny_llama, "config.json")))
    assert overrides == {**YarnConfig(factor=2.0).hf_overrides(hf), "sliding_window": None}
    assert cmd[cmd.index("--max-model-len") + 1] == "2048"


def test_cpu_tensor_parallel_binds_one_core_group_per_rank(tiny_llama):
    assert cpu_thread_binding(2, [0, 1]) == "0|1"
    assert cpu_thread_binding(2, [0, 1, 2, 3, 4]) == "0,1|2,3"
    with pytest.raises(UserError, match="`--tensor-parallel-size` is 4, more than the 2 CPU"):
        cpu_thread_binding(4, [0, 1])
    cores = sorted(os.sched_getaffinity(0))
    if len(cores) < 2 or "VLLM_CPU_OMP_THREADS_BIND" in os.environ:
        return
    cmd, env = serve_command(tiny_llama, None, ["-tp", "2", "--distributed-executor-backend",
                                                "mp"], cpu=True, env={})
    assert env["VLLM_CPU_OMP_THREADS_BIND"] == cpu_thread_binding(2, cores)
    assert "--enforce-eager" in cmd and env["VLLM_CPU_KVCACHE_SPACE"] == "4"


# ---- the command builder, table-driven: argv and env in, argv or one line out ------------

YARN2 = YarnConfig(factor=2.0)  # the tiny model is trained to 1,024: 2,048 extended
FACTOR_FLAG = {"factor": ("--factor", 2.0)}


def _overrides(cmd):
    return json.loads(cmd[cmd.index("--hf-overrides") + 1])


def _ours(tiny_llama):
    with open(os.path.join(tiny_llama, "config.json")) as f:
        return YarnConfig(factor=2.0).hf_overrides(json.load(f))


def _merged_theta(cmd, env, ours):
    got = _overrides(cmd)
    assert got["rope_parameters"] == {**ours["rope_parameters"], "rope_theta": 500000.0}
    assert got["max_position_embeddings"] == 2048  # YaRN kept with its extended length
    assert cmd[cmd.index("--max-model-len") + 1] == "2048" and cmd.count("--hf-overrides") == 1


def _user_engine_flags_kept(cmd, env, ours):
    assert cmd.count("--dtype") == 1 and cmd[cmd.index("--dtype") + 1] == "bfloat16"
    assert "--enforce-eager" not in cmd and "--no-enforce-eager" in cmd
    assert env["VLLM_CPU_KVCACHE_SPACE"] == "4"  # the CPU default we still own


def _user_eager_once(cmd, env, ours):
    assert cmd.count("--enforce-eager") == 1


def _user_key_wins_without_a_flag(cmd, env, ours):
    assert _overrides(cmd)["rope_parameters"]["beta_fast"] == 16.0


def _same_value_as_the_flag(cmd, env, ours):
    assert _overrides(cmd) == ours


# (case, YaRN setting, YaRN flags given, argv, env, an error's start or a check of (cmd, env))
BUILDER_CASES = [
    ("invalid JSON in --hf-overrides", YARN2, FACTOR_FLAG, ["--hf-overrides", "{rope: 5e5"], {},
     "serve: `--hf-overrides` is not JSON: '{rope: 5e5'. Fix: pass a JSON object"),
    ("--hf-overrides not an object", YARN2, FACTOR_FLAG, ["--hf-overrides", "[1, 2]"], {},
     "command line: `--hf-overrides` is [1, 2], not a JSON object"),
    ("--max-model-len past the extended length", YARN2, FACTOR_FLAG,
     ["--max-model-len", "4096"], {},
     "yarn config: `max_model_len` is 4096, past the extended context of 2048 tokens. Fix: "),
    ("VLLM_PLUGINS leaves the plugin out", YARN2, FACTOR_FLAG, [],
     {"VLLM_PLUGINS": "some_other_plugin"},
     "environment: `VLLM_PLUGINS` is 'some_other_plugin', which leaves out yarn_vllm"),
    ("a non-integer -tp", YARN2, FACTOR_FLAG, ["-tp", "two"], {},
     "serve: `--tensor-parallel-size` is 'two', not a whole number. Fix: "),
    ("a non-integer --max-model-len", YARN2, FACTOR_FLAG, ["--max-model-len=4k"], {},
     "serve: `--max-model-len` is '4k', not a whole number"),
    ("the user's --dtype and --no-enforce-eager", YARN2, FACTOR_FLAG,
     ["--dtype", "bfloat16", "--no-enforce-eager"], {}, _user_engine_flags_kept),
    ("the user's --enforce-eager", YARN2, FACTOR_FLAG, ["--enforce-eager"], {},
     _user_eager_once),
    ("rope_parameters merged key by key", YARN2, FACTOR_FLAG,
     ["--hf-overrides", '{"rope_parameters": {"rope_theta": 500000.0}}'], {}, _merged_theta),
    ("rope_scaling (legacy spelling) merged the same way", YARN2, FACTOR_FLAG,
     ["--hf-overrides", '{"rope_scaling": {"rope_theta": 500000.0}}'], {}, _merged_theta),
    ("a user key against a YaRN flag", YARN2, FACTOR_FLAG,
     ["--hf-overrides", '{"rope_parameters": {"rope_theta": 5e5, "factor": 4.0}}'], {},
     "command line: `--factor` is 2.0 but --hf-overrides sets rope_parameters.factor=4.0. "
     "Fix: give it once: drop rope_parameters.factor from --hf-overrides or drop --factor"),
    ("a user key against --target-context", YarnConfig(target_context=2048),
     {"target_context": ("--target-context", 2048)},
     ["--hf-overrides", '{"max_position_embeddings": 4096}'], {},
     "command line: `--target-context` is 2048 but --hf-overrides sets "
     "max_position_embeddings=4096"),
    ("a user key equal to the flag's value", YARN2, FACTOR_FLAG,
     ["--hf-overrides", '{"rope_parameters": {"factor": 2.0}}'], {}, _same_value_as_the_flag),
    ("a user key no flag set wins (YAML settings)", YARN2, {},
     ["--hf-overrides", '{"rope_parameters": {"beta_fast": 16.0}}'], {},
     _user_key_wins_without_a_flag),
    ("a typo in yarn_mode", YARN2, FACTOR_FLAG,
     ["--hf-overrides", '{"rope_parameters": {"yarn_mode": "dynamc"}}'], {},
     "--hf-overrides merged with YaRN: "),
    ("a rope_type that is not YaRN", YARN2, FACTOR_FLAG,
     ["--hf-overrides", '{"rope_parameters": {"rope_type": "linear"}}'], {},
     "--hf-overrides merged with YaRN: `rope_type` is 'linear'"),
    ("rope_parameters not a mapping", YARN2, FACTOR_FLAG,
     ["--hf-overrides", '{"rope_parameters": 5}'], {},
     "--hf-overrides: `rope_parameters` is 5, not a mapping"),
]


@pytest.mark.parametrize("case, yarn, flags, argv, env, want", BUILDER_CASES,
                         ids=[c[0] for c in BUILDER_CASES])
def test_serve_command_builder(tiny_llama, case, yarn, flags, argv, env, want):
    """No engine: what `yarn-vllm serve` would exec, or the one line it would print."""
    if isinstance(want, str):
        with pytest.raises(UserError) as e:
            serve_command(tiny_llama, yarn, argv, flags=flags, cpu=True, env=env)
        assert str(e.value).startswith(want) and "\n" not in str(e.value), str(e.value)
        if "dynamc" in " ".join(argv):
            assert "dynamc" in str(e.value)
        return
    cmd, out_env = serve_command(tiny_llama, yarn, argv, flags=flags, cpu=True, env=env)
    assert cmd[1:5] == ["-m", "yarn_vllm.tools.openai_server", "--model", tiny_llama]
    want(cmd, out_env, _ours(tiny_llama))


def test_hf_overrides_merge_drops_nothing_through_generate_too(tiny_llama):
    """Offline engines (generate, eval, bench, sweeps, replicas) get their LLM(...) arguments
    from the builder serve uses, with the same merge and checks."""
    from yarn_vllm.tools.engine_args import engine_setup

    hf = json.load(open(os.path.join(tiny_llama, "config.json")))
    kwargs = engine_setup({"hf_overrides": {"rope_parameters": {"rope_theta": 5e5}}},
                          hf_config=hf, yarn=YARN2, flags=FACTOR_FLAG, cpu=True).kwargs
    assert kwargs["hf_overrides"]["rope_parameters"] == {**_ours(tiny_llama)["rope_parameters"],
                                                         "rope_theta": 500000.0}
    assert kwargs["max_model_len"] == 2048 and kwargs["enforce_eager"] is True
    with pytest.raises(UserError, match="`--factor` is 2.0 but --hf-overrides sets"):
        engine_setup({"hf_overrides": {"rope_parameters": {"factor": 3}}}, hf_config=hf,
                     yarn=YARN2, flags=FACTOR_FLAG)
    with pytest.raises(UserError, match="`max_model_len` is 4096, past the extended context"):
        engine_setup({"max_model_len": 4096}, hf_config=hf, yarn=YARN2)


@pytest.mark.parametrize("user, cores, env, want", [
    ({}, None, {}, None),                                  # one rank: no binding
    ({"tensor_parallel_size": 2}, [0, 1], {}, "0|1"),      # what vLLM's CPU platform needs
    ({"tensor_parallel_size": 2}, [0, 1, 2, 3, 4], {}, "0,1|2,3"),
    ({"tensor_parallel_size": 2, "pipeline_parallel_size": 2}, [0, 1, 2, 3], {}, "0|1|2|3"),
    ({}, [2, 3], {}, "2,3"),                               # one replica's share of the cores
    ({"tensor_parallel_size": 2}, [0, 1], {"VLLM_CPU_OMP_THREADS_BIND": "1|0"}, None),  # user's
    ({"tensor_parallel_size": 4}, [0, 1], {}, "engine: `--tensor-parallel-size` is 4, more "
     "than the 2 CPU cores"),
    ({"tensor_parallel_size": "two"}, None, {}, "engine: `--tensor-parallel-size` is 'two', "
     "not a whole number"),
    ({"distributed_executor_backend": "ray"}, None, {}, "engine: `--distributed-executor-"
     "backend` is ray, which vLLM's CPU platform does not support"),
])
def test_one_builder_binds_cpu_ranks_for_every_engine(user, cores, env, want):
    """TP/PP on the CPU wherever an engine starts: one core group per rank, or one line."""
    from yarn_vllm.tools.engine_args import engine_setup

    if want is not None and "`" in want:
        with pytest.raises(UserError) as e:
            engine_setup(user, cores=cores, env=env, cpu=True)
        assert str(e.value).startswith(want)
        return
    setup = engine_setup(user, cores=cores, env=env, cpu=True)
    assert setup.env.get("VLLM_CPU_OMP_THREADS_BIND") == want
    assert setup.env["VLLM_CPU_NUM_OF_RESERVED_CPU"] == "0"  # offline: no API server's core
    assert setup.apply_env(dict(env)).get("VLLM_CPU_OMP_THREADS_BIND") == (
        want or env.get("VLLM_CPU_OMP_THREADS_BIND"))
    assert engine_setup(user, cores=cores, env=env, cpu=False).env == {}  # GPUs: vLLM's own


# ---- private by default: loopback, where it listens, no secret printed --------------------

def test_binds_loopback_unless_host_is_given(tiny_llama):
    from yarn_vllm.tools.cli.serve import announce

    cmd, env = serve_command(tiny_llama, YARN2, ["--port", "8123"], cpu=True, env={})
    assert cmd[cmd.index("--host") + 1] == "127.0.0.1" and cmd.count("--host") == 1
    out, warnings = announce(cmd, env)
    assert out[1] == "yarn-vllm serve: listening on http://127.0.0.1:8123" and warnings == []
    for given in (["--host", "0.0.0.0"], ["--host=0.0.0.0"]):
        cmd, env = serve_command(tiny_llama, YARN2, given, cpu=True, env={})
        assert cmd.count("--host") + cmd.count("--host=0.0.0.0") == 1  # the user's, only
        out, [warning] = announce(cmd, env)
        assert out[1] == "yarn-vllm serve: listening on http://0.0.0.0:8000"
        assert warning.startswith("yarn-vllm serve: warning: 0.0.0.0 is beyond loopback and "
                                  "there is no API key") and "Fix: set VLLM_API_KEY" in warning
    cmd, env = serve_command(tiny_llama, None, ["--uds", "/tmp/s.sock"], cpu=True, env={})
    assert "--host" not in cmd  # a unix socket has no host
    assert announce(cmd, env)[0][1] == "yarn-vllm serve: listening on unix socket /tmp/s.sock"


@pytest.mark.parametrize("host, key_flags, env, warned", [
    ("0.0.0.0", [], {}, "no API key"),
    ("::", [], {}, "no API key"),
    ("my-host.example", [], {}, "no API key"),  # a name may resolve anywhere
    ("0.0.0.0", ["--api-key", "k"], {}, "guards only"),
    ("0.0.0.0", [], {"VLLM_API_KEY": "k"}, "guards only"),  # vLLM reads it without --api-key
    ("127.0.0.2", [], {}, None),
    ("::1", [], {}, None),
    ("localhost", [], {}, None),
])
def test_warns_beyond_loopback_naming_what_the_key_leaves_open(host, key_flags, env, warned):
    from yarn_vllm.tools.cli.serve import announce

    cmd = [sys.executable, "-m", "yarn_vllm.tools.openai_server", "--host", host, *key_flags]
    warnings = announce(cmd, env)[1]
    assert len(warnings) == (warned is not None)
    if warned:
        assert warned in warnings[0]
    if warned == "guards only":
        assert all(route in warnings[0] for route in UNGUARDED_ROUTES)


def test_unguarded_routes_are_what_vllms_key_check_leaves_open():
    """The warning's list, read off vLLM's own app for a generative model with a key set:
    every route outside vLLM's guarded prefixes, less the docs pages and liveness probes."""
    from vllm.entrypoints.launchers.app import build_app
    from vllm.entrypoints.launchers.cli_args import make_arg_parser
    from vllm.entrypoints.serve.middleware.authenticate import GUARDED_PREFIX
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    args = make_arg_parser(FlexibleArgumentParser()).parse_args(["--model", "m", "--api-key", "k"])
    paths = {getattr(r, "path", None) for r in build_app(args, ("generate",)).routes} - {None}
    open_routes = {p for p in paths if not p.startswith(GUARDED_PREFIX)}
    harmless = {"/docs", "/docs/oauth2-redirect", "/openapi.json", "/redoc", "/health", "/ping"}
    assert open_routes - harmless == set(UNGUARDED_ROUTES)


def test_the_api_key_leaves_the_command_line_for_the_environment(tiny_llama):
    """`ps` and /proc/<pid>/cmdline show a command line to every local user."""
    from yarn_vllm.tools.cli.serve import announce

    for argv in (["--api-key", "s3cret", "--port", "9"], ["--api-key=s3cret", "--port", "9"]):
        cmd, env = serve_command(tiny_llama, YARN2, argv + ["--host", "0.0.0.0"], cpu=True,
                                 env={})
        assert "s3cret" not in " ".join(cmd) and env["VLLM_API_KEY"] == "s3cret"
        assert cmd[cmd.index("--port") + 1] == "9"
        assert "guards only" in announce(cmd, env)[1][0]
    with pytest.raises(UserError, match="`--api-key` has 2 keys"):
        serve_command(tiny_llama, YARN2, ["--api-key", "a", "b"], cpu=True, env={})


def test_secrets_are_hidden_in_what_serve_prints(tiny_llama):
    from yarn_vllm.tools.cli.serve import announce

    argv = ["--hf-token=hf_s3cret", "--max-num-batched-tokens", "2048", "--ssl-keyfile",
            "/k.pem", "--client-secret", "s3cret-c", "--port", "9"]
    cmd, env = serve_command(tiny_llama, YARN2, argv, cpu=True, env={})
    out, _ = announce(cmd, env)
    printed = "\n".join(out)
    assert "s3cret" not in printed
    assert "--hf-token=*** --max-num-batched-tokens 2048 --ssl-keyfile /k.pem --client-secret " \
           "*** --port 9" in printed


def test_redaction_rule():
    from yarn_vllm.tools.redact import is_secret, redact_argv, redact_kwargs

    assert all(map(is_secret, ["--api-key", "--hf-token", "hf_token", "--aws-secret-access-key",
                               "--db-password", "--API_KEY=x", "--keys"]))
    assert not any(map(is_secret, ["--max-num-batched-tokens", "--ssl-keyfile", "--tokenizer",
                                   "--dbo-decode-token-threshold", "--port", "--key-file"]))
    assert redact_argv(["--api-key", "a", "-1", "--port", "1"]) == [
        "--api-key", "***", "***", "--port", "1"]  # "-1" is a value, not a flag
    assert redact_kwargs({"hf_token": "t", "dtype": "float32", "api_key": None}) == {
        "hf_token": "***", "dtype": "float32", "api_key": None}


def test_a_secret_flag_with_a_bad_value_is_not_echoed():
    from yarn_vllm.tools.cli.args import passthrough_kwargs

    with pytest.raises(UserError) as e:
        passthrough_kwargs(["--hf-token", "{s3cret"])
    assert "s3cret" not in str(e.value) and "`--hf-token` is not valid JSON: '***'" in str(e.value)
