"""Offline/online benchmark maths and outputs, methods, the sweep file's errors, and one real
`bench offline` run of Dynamic YaRN on the tiny Llama. The online benchmark runs against a
real server in tests/test_serve_tiny.py."""

from __future__ import annotations

import csv
import json
import os
import random
import re
import subprocess
import sys
import time

import numpy as np
import pytest

from yarn_vllm.tools.bench.measure import Step, summarise
from yarn_vllm.tools.bench.offline import method_spec
from yarn_vllm.tools.methods import checked_factor
from yarn_vllm.tools.bench.online import percentile, write_online
from yarn_vllm.tools.bench.report import ratios, write_offline
from yarn_vllm.tools.bench.sweep_config import config_id, load_sweep, parse_sweep
from yarn_vllm.yarn.config import YarnConfig
from yarn_vllm.errors import UserError


def test_summarise_hand_timeline():
    """Batch 2 of 100-token prompts, 4 tokens each: request 1 starts decoding at t=1 while
    request 2 is still prefilling, so the prefill phase ends at t=2, holding 3 tokens."""
    steps = [Step(1.0, {"a": 1, "b": 0}), Step(2.0, {"a": 2, "b": 1}),
             Step(3.0, {"a": 3, "b": 2}), Step(4.0, {"a": 4, "b": 3}),
             Step(5.0, {"a": 4, "b": 4})]
    r = summarise(0.0, steps, prompt_len=100, batch=2, output_tokens=4)
    assert r["prefill_s"] == 2.0 and r["prefill_tok_s"] == 100.0
    assert r["decode_s"] == 3.0 and r["decode_tok_s"] == pytest.approx(5 / 3)
    assert r["e2e_tok_s"] == pytest.approx(208 / 5) and r["total_s"] == 5.0
    assert r["decode_steps"] == 3 and r["tpot_ms"] == pytest.approx(1000.0)
    assert r["ttft_mean_s"] == 1.5 and r["generated_tokens"] == 8


def test_summarise_refuses_unfinished_prefill():
    with pytest.raises(ValueError, match="only 1 of 2"):
        summarise(0.0, [Step(1.0, {"a": 1, "b": 0})], 10, 2, 1)


def test_percentile_matches_numpy():
    rng = random.Random(0)
    for n in (1, 2, 7, 100):
        xs = [rng.expovariate(1.0) for _ in range(n)]
        for q in (50, 90, 99):
            assert percentile(xs, q) == pytest.approx(float(np.percentile(xs, q)))


def _row(method, ctx, prefill, decode, e2e):
    return {"method": method, "context": ctx, "batch": 1, "output_tokens": 8,
            "prefill_tok_s": prefill, "decode_tok_s": decode, "e2e_tok_s": e2e,
            "prefill_s": ctx / prefill, "decode_s": 1.0, "total_s": 2.0, "tpot_ms": 10.0,
            "ttft_mean_s": 1.0, "repeats": 1}


def test_ratios_and_written_outputs(tmp_path):
    rows = [_row("vllm-yarn", 1024, 200.0, 10.0, 50.0), _row("yarn", 1024, 250.0, 8.0, 60.0),
            _row("trained", 1024, 100.0, None, 25.0), _row("yarn", 2048, 1.0, 1.0, 1.0)]
    assert ratios(rows) == [
        {"method": "yarn", "context": 1024, "batch": 1, "prefill_tok_s": 1.25,
         "decode_tok_s": 0.8, "e2e_tok_s": 1.2},
        {"method": "trained", "context": 1024, "batch": 1, "prefill_tok_s": 0.5,
         "decode_tok_s": None, "e2e_tok_s": 0.5}]  # no baseline at 2048: no ratio
    results = {"settings": {"model": "/m/tiny", "factor": 2.0, "output_tokens": 8},
               "methods": {"yarn": {"dtype": "bfloat16"}}, "rows": rows}
    lines = []
    paths = write_offline(results, str(tmp_path), log=lines.append)
    saved = json.loads(open(paths["json"]).read())
    assert saved["ratios"] == ratios(rows)
    with open(paths["csv"]) as f:
        table = list(csv.DictReader(f))
    assert [(r["method"], int(r["context"])) for r in table] == [(r["method"], r["context"])
                                                                  for r in rows]
    assert float(table[1]["prefill_tok_s"]) == 250.0
    assert open(paths["png"], "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    assert any("1.25x" in line for line in lines)


HF = {"max_position_embeddings": 1024, "rope_theta": 10000.0, "head_dim": 64, "hidden_size": 256,
      "num_attention_heads": 4, "vocab_size": 512}


def test_method_engine_settings():
    """One registry for eval and bench: each method's hf_overrides and plugin switch, and the
    same length limit for every method."""
    def spec(name, factor=2.0, contexts=(1400,)):
        return method_spec("/m", name, HF, contexts=list(contexts), batches=[2],
                           output_tokens=84, factor=factor)

    (ours, ours_plugins), (vllm, vllm_plugins) = spec("yarn"), spec("vllm-yarn")
    assert ours_plugins and not vllm_plugins
    assert ours["llm_kwargs"]["hf_overrides"] == vllm["llm_kwargs"]["hf_overrides"] == \
        YarnConfig(factor=2.0).hf_overrides(HF)
    dynamic = spec("yarn-dynamic")[0]["llm_kwargs"]["hf_overrides"]["rope_parameters"]
    assert dynamic["yarn_mode"] == "dynamic" and spec("yarn-dynamic")[1]
    trained, plugins = spec("trained")
    assert plugins and trained["llm_kwargs"]["hf_overrides"] == {"max_position_embeddings": 2048}
    assert all(spec(m)[0]["llm_kwargs"]["max_model_len"] == 1500
               for m in ("yarn", "vllm-yarn", "trained", "pi", "ntk"))
    # the length limit covers the longest case even past factor x trained
    assert spec("yarn", 1.0)[0]["llm_kwargs"]["hf_overrides"]["max_position_embeddings"] == 1500
    assert spec("yarn")[0]["method"] == "yarn" and spec("yarn")[0]["llm_kwargs"][
        "max_num_seqs"] == 2


@pytest.mark.parametrize("contexts, output_tokens, factor", [
    ([1000], 24, 2.0),          # exactly the trained length: still extended (at least 2)
    ([2048], 0, 2.0),           # exactly 2x
    ([2048], 1, 4.0),           # just past 2x: the next power of two, not 2.001 or 3
    ([4000, 8000], 32, 8.0),
])
def test_default_factor_is_one_rule(contexts, output_tokens, factor):
    assert checked_factor(HF, max(contexts) + output_tokens, None) == factor
    assert checked_factor(HF, max(contexts) + output_tokens, 3.0) == 3.0  # a given factor wins


# ---- the sweep file ---------------------------------------------------------------------------

def test_sweep_grid_expands():
    s = parse_sweep({"model": "m", "context_lengths": [512], "output_tokens": 4,
                     "grid": {"method": ["vllm-yarn", "yarn"],
                              "batch_sizes": [1, [2, 4]]}}, source="s.yaml")
    assert s["settings"] == {"model": "m", "num_cpus": 2, "timeout_s": 1800, "retries": 1,
                             "resources": {}, "output": "bench_results/s.jsonl"}
    assert [(c["method"], c["batch_sizes"]) for c in s["configs"]] == [
        ("vllm-yarn", [1]), ("vllm-yarn", [2, 4]), ("yarn", [1]), ("yarn", [2, 4])]
    assert all(c["context_lengths"] == [512] and c["model"] == "m" for c in s["configs"])
    ids = [config_id(c) for c in s["configs"]]
    assert len(set(ids)) == 4 and ids == [config_id(dict(c)) for c in s["configs"]]


@pytest.mark.parametrize("raw, field, fix", [
    ({"method": "trained", "context_lengths": [1], "speed": 3}, "speed", "use only:"),
    ({"method": "trained", "context_lengths": "1024"}, "context_lengths",
     "context_lengths: [1024, 2048]"),
    ({"method": "trained", "context_lengths": [1024, -5]}, "context_lengths", "[1024, 2048]"),
    ({"method": "turbo", "context_lengths": [1024]}, "method", "method: yarn"),
    ({"method": "trained", "context_lengths": [8], "timeout_s": "soon"}, "timeout_s",
     "timeout_s: 1800"),
    ({"method": "trained", "context_lengths": [8], "retries": True}, "retries", "retries: 1"),
    ({"context_lengths": [1024]}, "method", "set it at top level or under grid"),
    ({"method": "trained"}, "context_lengths", "set it at top level or under grid"),
    ({"context_lengths": [8], "grid": {"method": []}}, "grid.method", "list the values"),
    ({"context_lengths": [8], "grid": {"method": ["trained"], "colour": ["red"]}}, "grid.colour",
     "use only:"),
    ({"context_lengths": [8], "grid": {"method": ["trained", 7]}}, "grid.method", "one of"),
    (["method", "trained"], "(top level)", "write a mapping"),
    ({"method": "trained", "context_lengths": [8], "factor": float("inf")}, "factor",
     "finite number >= 1"),
    ({"method": "trained", "context_lengths": [8], "factor": float("nan")}, "factor",
     "finite number >= 1"),
    ({"method": "trained", "context_lengths": [8], "factor": 0.5}, "factor", "does not compress"),
    ({"context_lengths": [8], "method": "yarn", "grid": {"factor": [2.0, float("inf")]}},
     "grid.factor", "finite number >= 1"),
    ({"method": "trained", "context_lengths": [8], "num_cpus": float("inf")}, "num_cpus",
     "num_cpus: 2"),
    ({"method": "trained", "context_lengths": [8], "timeout_s": float("nan")}, "timeout_s",
     "timeout_s: 1800"),
    ({"method": "trained", "context_lengths": [8], "resources": {"node_b": -1}}, "resources",
     "resources: {node_b: 1}"),
])
def test_sweep_file_errors_name_field_and_fix(tmp_path, raw, field, fix):
    import yaml

    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(UserError) as e:
        load_sweep(str(path))
    msg = str(e.value)
    assert e.value.field == field and msg.startswith(f"{path}: `{field}`")
    assert "Fix:" in msg and fix in msg and "\n" not in msg


def test_sweep_cli_bad_yaml_is_one_line(tmp_path, capsys):
    from yarn_vllm.tools.cli import main

    path = tmp_path / "broken.yaml"
    path.write_text("method: [trained\ncontext_lengths: 1024\n")
    assert main(["bench", "sweep", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"yarn-vllm: {path}: `(file)` is not valid YAML at line 2. "
                   "Fix: write `key: value` lines; lists as [a, b]"]


def test_example_sweep_file_is_valid():
    import os

    path = os.path.join(os.path.dirname(__file__), "..", "..", "examples", "sweep.yaml")
    s = load_sweep(path)
    assert [c["method"] for c in s["configs"]] == ["vllm-yarn", "yarn", "trained", "yarn-dynamic"]
    assert s["settings"]["output"] == "bench_results/sweep.jsonl"


def test_bench_cli_parses_offline_by_default():
    from yarn_vllm.tools.cli import build_parser, normalise_argv
    from yarn_vllm.tools.methods import bench_methods

    argv = normalise_argv(["bench", "--context-lengths", "1024,4096", "--methods",
                           "vllm-yarn,yarn", "--max-num-seqs", "4"])
    args, unknown = build_parser().parse_known_args(argv)
    assert (args.bench_command, args.context_lengths, args.methods, args.batch_sizes) == (
        "offline", [1024, 4096], ["vllm-yarn", "yarn"], [1])
    assert unknown == ["--max-num-seqs", "4"]  # goes to vLLM's LLM(...)
    assert normalise_argv(["bench", "sweep", "s.yaml"]) == ["bench", "sweep", "s.yaml"]
    args, _ = build_parser().parse_known_args(normalise_argv(["bench"]))
    assert args.methods == bench_methods() == ["trained", "yarn", "yarn-dynamic", "yarn-request",
                                               "vllm-yarn"]
    for bad in (["--methods", "ours-static"], ["--context-lengths", "1024,0"]):
        with pytest.raises(SystemExit):
            build_parser().parse_known_args(["bench", "offline", *bad])


def test_engine_worker_dies_with_its_parent():
    """The engine subprocess helper's workers exit (whole process group) once the process
    that started them is gone: a watchdog thread, not preexec_fn, which can deadlock in a
    multithreaded parent such as a Ray actor."""
    import os
    import subprocess
    import sys

    from yarn_vllm.tools.engine_worker import PARENT_PID

    child = ("from yarn_vllm.tools.engine_worker import exit_with_parent; import time; "
             "exit_with_parent(poll_s=0.05); time.sleep(120)")
    # as run_worker starts one: its own session, told who its parent is
    parent = ("import os, subprocess, sys; p = subprocess.Popen([sys.executable, '-c', %r], "
              "start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, "
              "env={**os.environ, %r: str(os.getpid())}); "
              "print(p.pid, flush=True)" % (child, PARENT_PID))
    out = subprocess.run([sys.executable, "-c", parent], capture_output=True, text=True,
                         timeout=60)
    pid = int(out.stdout)  # the parent has exited; the child is an orphan now

    def gone() -> bool:  # exited, or a zombie its new parent has not reaped yet
        try:
            with open(f"/proc/{pid}/stat") as f:
                return f.read().split()[2] == "Z"
        except FileNotFoundError:
            return True

    for _ in range(200):
        if gone():
            break
        time.sleep(0.1)
    else:
        os.kill(pid, 9)
        pytest.fail("the orphaned worker is still running")


def test_writers_keep_to_the_output_folder(tmp_path):
    """`--name ../x` (or an absolute path) cannot place results outside `--out`."""
    from yarn_vllm.errors import UserError

    results = {"settings": {"model": "m", "factor": 2.0, "output_tokens": 1, "url": "u",
                            "concurrency": 1}, "rows": []}
    for name in ("../x", "/tmp/x", "a/b", "..", ""):
        for write in (write_offline, write_online):
            with pytest.raises(UserError, match="`--name` is .* not a plain file name"):
                write(results, str(tmp_path / "out"), name)
    assert not (tmp_path / "x.json").exists() and not (tmp_path / "out").exists()


def test_no_preexec_fn_anywhere():
    """CPython documents preexec_fn as a deadlock risk in threaded processes (Ray actors
    are); child processes are tied to their parent by exit_with_parent instead."""
    import yarn_vllm

    root = os.path.dirname(yarn_vllm.__file__)
    uses = [os.path.join(d, f) for d, _, files in os.walk(root) for f in files if f.endswith(".py")
            and re.search(r"preexec_fn\s*=", open(os.path.join(d, f), encoding="utf-8").read())]
    assert uses == []


def test_insecure_serialization_only_where_layers_are_introspected(monkeypatch):
    """VLLM_ALLOW_INSECURE_SERIALIZATION (LLM.apply_model pickles a function to the engine
    core) reaches an engine only when its spec asks for the layer classes; evaluations do
    not, so their engines keep vLLM's safe default."""
    from yarn_vllm.tools import engine_worker
    from yarn_vllm.tools.eval.run import run_method

    monkeypatch.delenv("VLLM_ALLOW_INSECURE_SERIALIZATION", raising=False)
    assert "VLLM_ALLOW_INSECURE_SERIALIZATION" not in engine_worker.engine_env(True)
    started = []  # what would start: (spec, env); the engines themselves run elsewhere
    monkeypatch.setattr(engine_worker, "run_worker",
                        lambda module, spec, **kw: started.append((spec, kw.get("env"))))
    run_method("/m", "yarn", HF, 2.0, [[1, 2]], {"max_tokens": 1})
    engine_worker.run_engine({"model": "/m", "prompts": [[1, 2]]})
    (evaluated, eval_env), (introspected, env) = started
    assert evaluated["introspect"] is False and "VLLM_ALLOW_INSECURE_SERIALIZATION" not in (
        eval_env or {})
    assert env["VLLM_ALLOW_INSECURE_SERIALIZATION"] == "1"


def test_bench_offline_runs_dynamic_yarn(tiny_llama, tmp_path):
    """`yarn-vllm bench offline --methods yarn-dynamic` on a real engine: a prompt past the
    tiny model's 1,024 trained positions, our rotary layer and our pre-RoPE attention backend,
    and the layer classes read without VLLM_ALLOW_INSECURE_SERIALIZATION (the bench engine
    core runs in its worker process)."""
    env = {k: v for k, v in os.environ.items() if k != "VLLM_ALLOW_INSECURE_SERIALIZATION"}
    proc = subprocess.run(
        [sys.executable, "-m", "yarn_vllm.tools.cli", "bench", "offline", "--model", tiny_llama,
         "--methods", "yarn-dynamic", "--context-lengths", "1100", "--batch-sizes", "2",
         "--output-tokens", "4", "--factor", "2", "--out", str(tmp_path), "--name", "dyn",
         "--dtype", "float32"], capture_output=True, text=True, timeout=900, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "dyn.json").read_text())
    engine = result["methods"]["yarn-dynamic"]
    assert engine["rotary_classes"] == ["yarn_vllm.vllm_seam.rotary.YarnRotaryEmbedding"]
    assert engine["attention_backends"] == ["yarn_vllm.attention.backend.YarnDynamicAttentionBackend"]
    [row] = result["rows"]
    assert (row["method"], row["context"], row["batch"], row["generated_tokens"]) == (
        "yarn-dynamic", 1100, 2, 8)
    assert row["prefill_tok_s"] > 0 and row["decode_tok_s"] > 0
    assert result["settings"]["factor"] == 2.0 and engine["dtype"] == "float32"


# ---- `bench online` against a server that wants a key (a stand-in: no engine) ------------------

@pytest.fixture
def keyed_server():
    """An HTTP server on 127.0.0.1 that answers /v1/models and a streamed completion only
    for `Authorization: Bearer k3y`, as vLLM's key check does on /v1."""
    import http.server
    import threading

    seen = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def _allowed(self):
            seen.append(self.headers.get("Authorization"))
            if self.headers.get("Authorization") != "Bearer k3y":
                self.send_response(401)
                self.end_headers()
                self.wfile.write(b'{"error": "Unauthorized"}')
                return False
            return True

        def do_GET(self):
            if self._allowed():
                body = json.dumps({"data": [{"id": "m", "root": None}]}).encode()
                self.send_response(200)
                self.end_headers()
                self.wfile.write(body)

        def do_POST(self):
            self.rfile.read(int(self.headers["Content-Length"]))
            if self._allowed():
                self.send_response(200)
                self.end_headers()
                for event in ({"choices": [{"text": "a"}]}, {"choices": [{"text": "b"}]},
                              {"choices": [], "usage": {"completion_tokens": 2}}):
                    self.wfile.write(f"data: {json.dumps(event)}\n\n".encode())
                self.wfile.write(b"data: [DONE]\n\n")

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}", seen
    server.shutdown()


def test_bench_online_sends_the_key_from_the_flag_or_the_environment(keyed_server, monkeypatch):
    from yarn_vllm.errors import UserError
    from yarn_vllm.tools.bench.online import run_online

    url, seen = keyed_server
    for name in ("OPENAI_API_KEY", "VLLM_API_KEY"):
        monkeypatch.delenv(name, raising=False)
    common = dict(num_requests=2, concurrency=1, output_tokens=2, vocab_size=50, log=lambda *_: None)
    assert run_online(url, [8], api_key="k3y", **common)["rows"][0]["requests"] == 2
    monkeypatch.setenv("VLLM_API_KEY", "k3y")  # what `yarn-vllm serve` hands vLLM
    assert run_online(url, [8], **common)["rows"][0]["requests"] == 2
    monkeypatch.setenv("OPENAI_API_KEY", "wrong")  # read first, as OpenAI clients do
    with pytest.raises(UserError, match=r"bench online: `--api-key` was refused by .* \(HTTP "
                                        r"401\)\. Fix: give the key the server was started"):
        run_online(url, [8], **common)
    monkeypatch.delenv("OPENAI_API_KEY")
    monkeypatch.delenv("VLLM_API_KEY")
    with pytest.raises(UserError, match="`--api-key` is not set and .* answered HTTP 401"):
        run_online(url, [8], **common)
    assert set(seen) == {"Bearer k3y", "Bearer wrong", None}
