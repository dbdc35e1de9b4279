"""`yarn-vllm serve` on the tiny Llama, in the default tier: one server per YaRN mode.

Both servers (static and dynamic, YaRN s=4: 4,096 positions on a model trained to
1,024) start once for the module and boot while the offline references run; every
test sends its requests to them. The references are the same prompts through vLLM
offline (yarn_vllm.tools.engine_worker) with the same overrides, dtype and CPU threads, and
greedy tokens must match exactly. The tiny model has no tokenizer, so the servers run
with --skip-tokenizer-init and take token ids. The static server requires an API key,
so the same runs show that the launcher never prints it.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import os
import random
import re
import socket
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest

from yarn_vllm.yarn.config import YarnConfig
from yarn_vllm.tools.engine_worker import run_engine
from yarn_vllm.tools.testing.server_process import LocalServer

FACTOR, MAX_LEN = 4.0, 4096
MODES = ("static", "dynamic")
# One setting for the servers and the references, so both use the same CPU threads; a
# small KV cache each, as four engines start at once.
ENV = {"VLLM_CPU_NUM_OF_RESERVED_CPU": "1", "VLLM_CPU_KVCACHE_SPACE": "1"}
# The references run engine core and model in their worker's own process: every process
# imports vLLM (~50 s of CPU on a loaded 2-core machine), and these are 2 of the module's
# 8. (A server's model runs in a process of its own: vLLM's CPU platform requires it.)
API_KEY = "sk-yarn-test-" + os.urandom(8).hex()  # the static server's
# The servers' token budget is below the long prompt and the longer streams (the offline
# engine's is 4,096): the servers prefill them in chunks, offline in one step, and in
# dynamic mode every chunk must run at the scale of the whole prompt.
SERVER_BUDGET = 1024
LONG, LONG_TOKENS = 2500, 8  # also past the trained 1,024 positions
STREAMS, SHORT_TOKENS = 32, 16
RNG = random.Random(0)
LONG_PROMPT = [RNG.randrange(2, 512) for _ in range(LONG)]
# 8 to ~1,500 tokens: the dynamic server runs some past the trained length (s > 1)
STREAM_PROMPTS = [[RNG.randrange(2, 512) for _ in range(8 + 47 * i)] for i in range(STREAMS)]
HANG_UPS = set(range(1, STREAMS, 4))  # 8 clients disconnect mid-stream
KEPT = [i for i in range(STREAMS) if i not in HANG_UPS]


def server_args(mode: str) -> list[str]:
    return (["--factor", str(FACTOR), "--yarn-mode", mode, "--skip-tokenizer-init",
             "--dtype", "float32", "--max-num-batched-tokens", str(SERVER_BUDGET)]
            + (["--api-key", API_KEY] if mode == "static" else []))


def api_key(mode: str) -> str:
    return API_KEY if mode == "static" else "none"


def offline(model: str, mode: str) -> list[dict]:
    """The long prompt, then every kept stream's prompt, through vLLM offline."""
    with open(os.path.join(model, "config.json")) as f:
        overrides = YarnConfig(factor=FACTOR, mode=mode).hf_overrides(json.load(f))
    prompts = [{"prompt_token_ids": LONG_PROMPT, "sampling": {"max_tokens": LONG_TOKENS}}]
    prompts += [{"prompt_token_ids": STREAM_PROMPTS[i], "sampling": {"max_tokens": SHORT_TOKENS}}
                for i in KEPT]
    spec = {"model": model, "prompts": prompts, "introspect": False,
            "llm_kwargs": {"hf_overrides": overrides, "max_model_len": MAX_LEN,
                           "dtype": "float32", "skip_tokenizer_init": True,
                           "distributed_executor_backend": "uni"},
            "sampling": {"detokenize": False}}
    return [o["token_ids"] for o in
            run_engine(spec, env=ENV, timeout=1200, in_process=True)["outputs"]]


@pytest.fixture(scope="module")
def launched(tiny_llama, tmp_path_factory):
    """Both servers, started but not yet waited for (see `servers`)."""
    logs = tmp_path_factory.mktemp("serve_tiny")
    started = {}
    try:
        for mode in MODES:
            started[mode] = LocalServer(tiny_llama, server_args(mode), env={**os.environ, **ENV},
                                        log_path=str(logs / f"{mode}.log")).start()
        yield started
    finally:
        for server in started.values():
            server.stop()


@pytest.fixture(scope="module")
def refs(launched, tiny_llama):
    """{mode: [long prompt's tokens, kept streams' tokens...]}, run while the servers boot."""
    with ThreadPoolExecutor(len(MODES)) as pool:
        futures = {mode: pool.submit(offline, tiny_llama, mode) for mode in MODES}
        return {mode: f.result() for mode, f in futures.items()}


@pytest.fixture(scope="module")
def servers(launched, refs):
    return {mode: server.wait_ready() for mode, server in launched.items()}


def metrics(server) -> dict[str, float]:
    """vLLM's /metrics (not behind the API key), summed over label sets."""
    out = {}
    for line in httpx.get(server.url + "/metrics", timeout=30).text.splitlines():
        m = re.match(r'(vllm:[a-z_]+)(\{[^}]*finished_reason="(\w+)"[^}]*\}|\{[^}]*\})? (\S+)$',
                     line)
        if m:
            name = m.group(1) + (f"[{m.group(3)}]" if m.group(3) else "")
            out[name] = out.get(name, 0.0) + float(m.group(4))
    return out


# ---- one request per mode through the real openai client (issue 17, item 2) -----------

@pytest.mark.parametrize("mode", MODES)
def test_one_long_request_equals_offline(servers, refs, mode):
    server = servers[mode]
    client = openai.OpenAI(base_url=server.base_url, api_key=api_key(mode), max_retries=0,
                           timeout=600)
    r = client.completions.create(model=server.model, prompt=LONG_PROMPT, max_tokens=LONG_TOKENS,
                                  temperature=0,
                                  extra_body={"ignore_eos": True, "return_token_ids": True})
    assert r.usage.prompt_tokens == LONG > SERVER_BUDGET
    assert r.choices[0].prompt_token_ids == LONG_PROMPT
    assert r.choices[0].token_ids == refs[mode][0]
    log = server.log()
    assert f"'max_num_batched_tokens': {SERVER_BUDGET}" in log  # so the prompt was chunked
    assert ("yarn_vllm: Dynamic YaRN: pre-RoPE attention backend" in log) == (mode == "dynamic")


def test_the_modes_really_differ(refs):
    """Each server matched its own mode's reference, and the references differ, so the
    comparison tells the modes apart (dynamic runs short prompts at s=1, static at s=4)."""
    assert refs["static"] != refs["dynamic"]
    assert sum(a != b for a, b in zip(refs["static"], refs["dynamic"])) >= len(KEPT) // 2


# ---- faults under load (issue 14, item 5) --------------------------------------------------

async def _streams(server, mode: str) -> list[list[int] | None]:
    """All STREAMS at once; a hang-up closes its connection after its first tokens."""
    client = openai.AsyncOpenAI(base_url=server.base_url, api_key=api_key(mode), max_retries=0,
                                timeout=600)

    async def one(i: int):
        hang_up = i in HANG_UPS
        # a hung-up request left running would generate up to the context's end: minutes
        stream = await client.completions.create(
            model=server.model, prompt=STREAM_PROMPTS[i], temperature=0, stream=True,
            max_tokens=MAX_LEN - len(STREAM_PROMPTS[i]) if hang_up else SHORT_TOKENS,
            extra_body={"ignore_eos": True, "return_token_ids": True})
        tokens = []
        async for chunk in stream:
            for choice in chunk.choices:
                tokens += getattr(choice, "token_ids", None) or []
            if hang_up and tokens:
                await stream.close()  # the client goes away mid-stream
                return None
        return tokens

    try:
        return await asyncio.gather(*(one(i) for i in range(STREAMS)))
    finally:
        await client.close()


def _settled(server, idle: dict, timeout: float = 60.0) -> dict:
    """/metrics once nothing runs or waits and the KV cache is back at its idle level."""
    deadline = time.monotonic() + timeout
    while True:
        now = metrics(server)
        if (now["vllm:num_requests_running"] == 0 and now["vllm:num_requests_waiting"] == 0
                and now["vllm:kv_cache_usage_perc"] == idle["vllm:kv_cache_usage_perc"]):
            return now
        if time.monotonic() > deadline:
            return now
        time.sleep(0.5)


@pytest.mark.parametrize("mode", MODES)
def test_clients_hanging_up_mid_stream_leave_the_others_and_the_server_intact(servers, refs,
                                                                               mode):
    server = servers[mode]
    idle = metrics(server)
    assert idle["vllm:num_requests_running"] == 0
    t0 = time.perf_counter()
    got = asyncio.run(_streams(server, mode))
    wall = time.perf_counter() - t0
    for k, i in enumerate(KEPT):  # the other 24 completed, each its own offline output
        assert got[i] == refs[mode][1 + k], f"stream {i}"
    after = _settled(server, idle)
    assert after["vllm:num_requests_running"] == 0 and after["vllm:num_requests_waiting"] == 0
    assert after["vllm:kv_cache_usage_perc"] == idle["vllm:kv_cache_usage_perc"]
    # the 8 were aborted, not left to generate their thousands of tokens: only the 24
    # finished, and the tokens generated are theirs and a few per hung-up stream
    def delta(name):
        return after.get(name, 0.0) - idle.get(name, 0.0)

    finished = sum(delta(f"vllm:request_success_total[{r}]") for r in ("stop", "length"))
    assert finished == len(KEPT), after
    assert delta("vllm:generation_tokens_total") < len(KEPT) * SHORT_TOKENS + len(HANG_UPS) * 200
    # and the server still serves
    client = openai.OpenAI(base_url=server.base_url, api_key=api_key(mode), max_retries=0,
                           timeout=600)
    r = client.completions.create(model=server.model, prompt=STREAM_PROMPTS[KEPT[-1]],
                                  max_tokens=SHORT_TOKENS, temperature=0,
                                  extra_body={"ignore_eos": True, "return_token_ids": True})
    assert r.choices[0].token_ids == refs[mode][-1]
    print(f"\n{mode}: {STREAMS} streams, {len(HANG_UPS)} hung up, {wall:.1f} s")


# ---- the launcher: loopback by default, no key in what it prints (issue 14, item 3) -------

def _outside_address() -> str | None:
    """This machine's address on its default route (no packet is sent), or None."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("10.255.255.255", 1))
            address = s.getsockname()[0]
        except OSError:
            return None
    return None if ipaddress.ip_address(address).is_loopback else address


def test_served_on_loopback_only_and_the_key_never_printed(servers):
    for mode, server in servers.items():
        log = server.log()
        # LocalServer passes no --host: this is `yarn-vllm serve`'s default
        assert f"yarn-vllm serve: listening on http://127.0.0.1:{server.port}\n" in log
        assert "--host 127.0.0.1" in log.splitlines()[0]
        assert not [ln for ln in log.splitlines()  # loopback: nothing to warn about
                    if ln.startswith("yarn-vllm serve: warning")]
        outside = _outside_address()
        if outside:
            with pytest.raises(ConnectionRefusedError):
                socket.create_connection((outside, server.port), timeout=10).close()
    log = servers["static"].log()
    assert API_KEY not in log, "the API key was printed"
    assert "--api-key" not in log.splitlines()[0]  # it reaches vLLM as VLLM_API_KEY instead
    r = httpx.post(servers["static"].base_url + "/completions", timeout=60,
                   json={"model": servers["static"].model, "prompt": [5, 6], "max_tokens": 1})
    assert r.status_code == 401  # the key is really required


# ---- `yarn-vllm bench online` against the real server (issue 17, item 9) -----------------

def test_bench_online_against_the_dynamic_server(servers, tmp_path):
    from yarn_vllm.tools.bench.online import run_online, write_online

    server = servers["dynamic"]
    out = run_online(server.url, [64, 1200], num_requests=4, concurrency=2, output_tokens=4,
                     log=lambda *_: None)
    assert out["settings"]["model"] == server.model
    assert out["settings"]["vocab_size"] == 512  # read from the served model's config
    for row in out["rows"]:
        reqs = row["per_request"]
        assert row["requests"] == len(reqs) == 4
        assert all(r["output_tokens"] == 4 and r["prompt_tokens"] == row["context"]
                   and 0 < r["ttft_s"] <= r["latency_s"] and r["tpot_s"] > 0 for r in reqs)
        assert row["ttft_p50_ms"] <= row["ttft_p90_ms"] <= row["ttft_p99_ms"]
    paths = write_online(out, str(tmp_path), log=lambda *_: None)
    assert json.loads(open(paths["json"]).read())["rows"][1]["context"] == 1200
    assert open(paths["png"], "rb").read(8) == b"\x89PNG\r\n\x1a\n"
