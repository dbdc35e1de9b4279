"""Ray sweeps: resume, a killed worker, a timeout (cheap fake work), and one real tiny engine."""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from yarn_vllm.tools.bench.sweep import read_results, run_sweep
from yarn_vllm.tools.bench.sweep_config import config_id


def fake_work(config: dict) -> dict:
    """Stands in for an engine: logs the call, leaves its pid for a killer, sleeps."""
    with open(config["calls"], "a") as f:
        f.write(config["name"] + "\n")
    open(os.path.join(config["pids"], f"{config['name']}.{os.getpid()}"), "w").close()
    time.sleep(config["sleep"])
    return {"name": config["name"], "pid": os.getpid()}


@pytest.fixture
def cluster(ray_cluster):
    # the workers cannot import this test module, so fake_work travels by value
    ray_cluster.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    return ray_cluster


def _configs(tmp_path, names, sleep=0.1):
    pids = tmp_path / "pids"
    pids.mkdir(exist_ok=True)
    return [{"name": n, "sleep": sleep, "calls": str(tmp_path / "calls.log"), "pids": str(pids)}
            for n in names]


def _calls(tmp_path):
    p = tmp_path / "calls.log"
    return p.read_text().split() if p.exists() else []


def test_rerun_resumes(cluster, tmp_path):
    out = str(tmp_path / "sweep.jsonl")
    configs = _configs(tmp_path, ["a", "b", "c"])
    first = run_sweep(configs, out, num_cpus=1, work=fake_work, log=lambda *_: None)
    assert first["ran"] == 3 and len(first["ok"]) == 3 and not first["failed"]
    assert sorted(_calls(tmp_path)) == ["a", "b", "c"]
    saved = read_results(out)
    assert set(saved) == {config_id(c) for c in configs}
    assert {r["result"]["name"] for r in saved.values()} == {"a", "b", "c"}

    second = run_sweep(configs, out, num_cpus=1, work=fake_work, log=lambda *_: None)
    assert second["ran"] == 0 and len(second["skipped"]) == 3
    assert len(_calls(tmp_path)) == 3  # no work done

    # a crash mid-write leaves a cut line: that configuration (only) runs again, and its
    # new record starts on a fresh line instead of being glued to the torn one
    lines = open(out).read().splitlines()
    cut = json.loads(lines[-1])["result"]["name"]
    with open(out, "w") as f:
        f.write("\n".join(lines[:-1]) + "\n" + lines[-1][:20])
    third = run_sweep(configs, out, num_cpus=1, work=fake_work, log=lambda *_: None)
    assert third["ran"] == 1 and _calls(tmp_path)[3:] == [cut]
    assert open(out).read().splitlines()[-2] == lines[-1][:20]
    fourth = run_sweep(configs, out, num_cpus=1, work=fake_work, log=lambda *_: None)
    assert fourth["ran"] == 0 and len(_calls(tmp_path)) == 4  # the record after it was read


def test_records_keep_no_secret(cluster, tmp_path):
    out = tmp_path / "sweep.jsonl"
    [config] = _configs(tmp_path, ["a"])
    config["llm_kwargs"] = {"hf_token": "hf_s3cret", "dtype": "float32"}
    run_sweep([config], str(out), num_cpus=1, work=fake_work, log=lambda *_: None)
    assert "s3cret" not in out.read_text()
    [rec] = read_results(str(out)).values()
    assert rec["id"] == config_id(config) and rec["config"]["llm_kwargs"] == {
        "hf_token": "***", "dtype": "float32"}
    assert run_sweep([config], str(out), num_cpus=1, work=fake_work,
                     log=lambda *_: None)["ran"] == 0  # still matched by its id


def test_lines_that_are_json_but_not_records_are_skipped(cluster, tmp_path):
    """Valid JSON that is not a record object (a list, a number, null, an id that is not a
    string) used to crash the reader; now it is skipped like a torn line."""
    out = tmp_path / "sweep.jsonl"
    configs = _configs(tmp_path, ["a"])
    out.write_text('[1, 2]\n3\nnull\n"x"\n{"id": [1]}\n{"status": "ok"}\n\n\xff\xfe\n')
    assert read_results(str(out)) == {}
    report = run_sweep(configs, str(out), num_cpus=1, work=fake_work, log=lambda *_: None)
    assert report["ran"] == 1 and list(read_results(str(out))) == [config_id(configs[0])]


def test_two_sweeps_on_one_file_run_each_configuration_once(cluster, tmp_path):
    """Started together on the same output, two sweeps share the work: every configuration
    runs once (a claim per configuration), and each sweep reports what it left to the other."""
    out = str(tmp_path / "sweep.jsonl")
    configs = _configs(tmp_path, ["a", "b", "c", "d"], sleep=1.0)
    with ThreadPoolExecutor(2) as pool:
        reports = list(pool.map(lambda _: run_sweep(configs, out, num_cpus=1, work=fake_work,
                                                    log=lambda *_: None), range(2)))
    assert sorted(_calls(tmp_path)) == ["a", "b", "c", "d"]  # no configuration twice
    ran = [r["config"]["name"] for rep in reports for r in rep["ok"]]
    assert sorted(ran) == ["a", "b", "c", "d"] and not any(rep["failed"] for rep in reports)
    for rep in reports:  # whatever one did not run, the other ran or had finished
        mine = {r["id"] for r in rep["ok"]}
        assert mine | set(rep["busy"]) | set(rep["skipped"]) == {config_id(c) for c in configs}
    assert set(read_results(out)) == {config_id(c) for c in configs}


def test_a_held_claim_is_left_alone_and_a_dead_holder_blocks_nothing(cluster, tmp_path):
    from yarn_vllm.tools.bench.sweep import Claims

    out = str(tmp_path / "sweep.jsonl")
    configs = _configs(tmp_path, ["a", "b"])
    other = Claims(out)  # another sweep's claim on "b" (flock: per open file, even in-process)
    assert other.take(config_id(configs[1]))
    report = run_sweep(configs, out, num_cpus=1, work=fake_work, log=lambda *_: None)
    assert _calls(tmp_path) == ["a"] and report["busy"] == [config_id(configs[1])]
    other.release_all()  # as when that sweep dies: the kernel drops its lock
    report = run_sweep(configs, out, num_cpus=1, work=fake_work, log=lambda *_: None)
    assert _calls(tmp_path) == ["a", "b"] and report["ran"] == 1 and not report["busy"]


def _kill_when_seen(pid_dir, kills: dict, stop: threading.Event):
    """SIGKILL workers of the named configurations: kills[name] times each."""
    killed = set()
    while not stop.is_set():
        for entry in os.listdir(pid_dir):
            name, pid = entry.split(".")
            if entry not in killed and kills.get(name, 0) > 0:
                os.kill(int(pid), signal.SIGKILL)
                killed.add(entry)
                kills[name] -= 1
        time.sleep(0.05)


def test_killed_worker_is_retried_once_then_failed(cluster, tmp_path):
    out = str(tmp_path / "sweep.jsonl")
    configs = _configs(tmp_path, ["ok1", "dies_once", "dies_twice", "ok2"], sleep=1.0)
    stop = threading.Event()
    killer = threading.Thread(target=_kill_when_seen,
                              args=(configs[0]["pids"], {"dies_once": 1, "dies_twice": 2}, stop))
    killer.start()
    lines = []
    try:
        report = run_sweep(configs, out, num_cpus=1, retries=1, work=fake_work, log=lines.append)
    finally:
        stop.set()
        killer.join()
    by_name = {r["config"]["name"]: r for r in report["ok"] + report["failed"]}
    assert {n for n, r in by_name.items() if r["status"] == "ok"} == {"ok1", "ok2", "dies_once"}
    assert by_name["dies_once"]["attempts"] == 2
    failed = by_name["dies_twice"]
    assert failed["status"] == "failed" and failed["attempts"] == 2
    assert "worker died on each of 2 attempts" in failed["error"]
    assert _calls(tmp_path).count("dies_twice") == 2 and _calls(tmp_path).count("ok1") == 1
    assert read_results(out)[config_id(configs[2])]["status"] == "failed"
    assert any("FAILED " + config_id(configs[2]) in line for line in lines)
    # a rerun retries the failed configuration only
    again = run_sweep(configs, out, num_cpus=1, work=fake_work, log=lambda *_: None)
    assert again["ran"] == 1 and again["ok"][0]["config"]["name"] == "dies_twice"


def test_timeout_kills_the_worker_and_the_rest_finish(cluster, tmp_path):
    out = str(tmp_path / "sweep.jsonl")
    configs = _configs(tmp_path, ["slow"], sleep=120) + _configs(tmp_path, ["quick"])
    report = run_sweep(configs, out, num_cpus=1, timeout_s=5, work=fake_work,
                       log=lambda *_: None)
    assert [r["config"]["name"] for r in report["ok"]] == ["quick"]
    [failed] = report["failed"]
    assert failed["config"]["name"] == "slow" and "timed out after 5 s" in failed["error"]
    pid = int(next(e for e in os.listdir(configs[0]["pids"]) if e.startswith("slow")).split(".")[1])
    for _ in range(200):  # ray.kill is asynchronous
        if not os.path.exists(f"/proc/{pid}") or "Z" in open(f"/proc/{pid}/stat").read().split()[2]:
            break
        time.sleep(0.1)
    else:
        pytest.fail(f"the timed-out worker {pid} is still running")


@pytest.mark.slow  # one engine: ~35 s on an idle 2-core machine, 80 s under load
def test_real_tiny_engine_config(cluster, tiny_llama, tmp_path):
    """The real path: one engine in an actor, a 1,100-token prompt past 1,024 trained."""
    out = str(tmp_path / "sweep.jsonl")
    config = {"model": tiny_llama, "method": "yarn", "context_lengths": [1100],
              "batch_sizes": [2], "output_tokens": 4, "factor": 2.0, "repeats": 1,
              "llm_kwargs": {}}
    report = run_sweep([config], out, num_cpus=2, timeout_s=900, log=lambda *_: None)
    assert not report["failed"], report["failed"]
    result = read_results(out)[config_id(config)]["result"]
    [row] = result["rows"]
    assert (row["method"], row["context"], row["batch"], row["generated_tokens"]) == (
        "yarn", 1100, 2, 8)
    assert row["prefill_tok_s"] > 0 and row["decode_tok_s"] > 0
    assert result["rotary_classes"] == ["yarn_vllm.vllm_seam.rotary.YarnRotaryEmbedding"]


def test_cli_sweep_resumes_and_summarises(cluster, tmp_path, capsys):
    """`yarn-vllm bench sweep` on a file whose results are all recorded: no work, a summary."""
    from yarn_vllm.tools.bench.sweep_config import load_sweep
    from yarn_vllm.tools.cli import main

    out = tmp_path / "s.jsonl"
    path = tmp_path / "s.yaml"
    path.write_text(f"model: /nowhere\noutput: {out}\ncontext_lengths: [1024, 2048]\n"
                    "grid:\n  method: [vllm-yarn, yarn]\n")
    with open(out, "w") as f:
        for i, config in enumerate(load_sweep(str(path))["configs"]):
            rows = [{"method": config["method"], "context": c, "batch": 1, "output_tokens": 32,
                     "prefill_tok_s": 100.0 * (i + 1), "decode_tok_s": 5.0, "e2e_tok_s": 20.0,
                     "prefill_s": c / 100.0, "decode_s": 6.0, "total_s": 10.0, "tpot_ms": 200.0}
                    for c in config["context_lengths"]]
            f.write(json.dumps({"id": config_id(config), "config": config, "status": "ok",
                                "result": {"rows": rows}}) + "\n")
    assert main(["bench", "sweep", str(path)]) == 0
    printed = capsys.readouterr().out
    assert "0 ok, 0 failed, 2 skipped" in printed
    assert "| yarn | 200.0 | 200.0 |" in printed  # the summary table
    assert (tmp_path / "s.csv").read_text().count("\n") == 5 and (tmp_path / "s.png").exists()
