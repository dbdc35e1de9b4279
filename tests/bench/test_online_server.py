"""`yarn-vllm bench online` against a real `yarn-vllm serve` on loopback (slow: one server)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import pytest


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_online_against_served_model(smol_model, tmp_path):
    import httpx

    from yarn_vllm.bench.online import run_online, write_online

    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    log = open(tmp_path / "server.log", "w")
    server = subprocess.Popen([sys.executable, "-m", "yarn_vllm.cli", "serve", smol_model,
                               "--factor", "2", "--port", str(port), "--host", "127.0.0.1",
                               "--max-model-len", "4096", "--enforce-eager"],
                              stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        for _ in range(900):
            assert server.poll() is None, (tmp_path / "server.log").read_text()[-3000:]
            try:
                if httpx.get(url + "/v1/models", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(1)
        out = run_online(url, [256, 1024], num_requests=4, concurrency=2, output_tokens=8,
                         log=lambda *_: None)
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(60)
    assert out["settings"]["vocab_size"] == 49152  # read from the served model's config
    for row in out["rows"]:
        assert row["requests"] == 4
        assert all(r["output_tokens"] == 8 and r["ttft_s"] > 0 and r["tpot_s"] > 0
                   for r in row["per_request"])
        assert row["ttft_p50_ms"] <= row["ttft_p90_ms"] <= row["ttft_p99_ms"]
    paths = write_online(out, str(tmp_path), log=lambda *_: None)
    assert all(os.path.getsize(p) > 0 for p in paths.values())
