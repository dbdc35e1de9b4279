"""`yarn-vllm serve` on loopback, through a real `openai` client, against vLLM run offline.

One server per module: the default model (SmolLM2-135M, trained to 8k) served with
YaRN s=2 (16k context). The reference is the same prompts run offline through vLLM
(`yarn_vllm.tools.engine_worker`, a fresh process) with the same YaRN overrides, dtype,
eager mode and CPU threads; greedy outputs must match token for token.
"""

from __future__ import annotations

import asyncio
import json
import os
import time

import httpx
import numpy as np
import openai
import pytest

from yarn_vllm.yarn.config import YarnConfig
from yarn_vllm.tools.engine_worker import run_engine
from yarn_vllm.tools.testing.server_process import LocalServer

FACTOR, MAX_TOKENS = 2.0, 24
# One setting for the server and the reference, so both engines use the same CPU threads.
ENV = {"VLLM_CPU_NUM_OF_RESERVED_CPU": "1", "VLLM_CPU_KVCACHE_SPACE": "4"}
COMPLETIONS = ["The Library of Congress held a workshop on electronic texts. The main topics were",
               "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n"]
CHAT = [{"role": "system", "content": "You are a concise assistant."},
        {"role": "user", "content": "Name three uses of a long context window."}]
SMALL_LOAD = (8, 128, 256)  # requests, shortest and longest prompt in tokens
# Tests that need the server and the offline engine. Measured on the shared 2-core box
# (load average 10-100): ~9 min of set-up and ~2.5 min of requests, past the default
# suite's budget, so they run with -m slow; the start-up checks are in test_serve_command.py.
served = pytest.mark.slow


def text_excerpts(tok, n: int, lo: int, hi: int, seed: int) -> list[list[int]]:
    """`n` token-id prompts of lo..hi tokens, each from a different place in lcet10.txt."""
    from yarn_vllm.tools.eval.run import default_text

    ids = tok(default_text(), add_special_tokens=False).input_ids
    rng = np.random.default_rng(seed)
    lengths = rng.integers(lo, hi + 1, n)
    starts = rng.choice(len(ids) - hi, n, replace=False)
    return [ids[s:s + int(k)] for s, k in zip(starts, lengths)]


def offline(model: str, prompts: list[list[int]], timeout: float = 1800,
            **sampling) -> list[dict]:
    """Greedy outputs of `prompts` through vLLM offline, settings as the server's."""
    hf = json.load(open(os.path.join(model, "config.json")))
    overrides = YarnConfig(factor=FACTOR).hf_overrides(hf)
    spec = {"model": model, "prompts": prompts, "introspect": False,
            "llm_kwargs": {"hf_overrides": overrides,
                           "max_model_len": overrides["max_position_embeddings"]},
            "sampling": {"max_tokens": MAX_TOKENS, "ignore_eos": False, **sampling}}
    return run_engine(spec, env=ENV, timeout=timeout)["outputs"]


@pytest.fixture(scope="module")
def tok(smol_model):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smol_model)


@pytest.fixture(scope="module")
def launched(smol_model, tmp_path_factory):
    """The server process, started but not yet waited for (see `cases`)."""
    log = str(tmp_path_factory.mktemp("serve") / "server.log")
    s = LocalServer(smol_model, ["--factor", str(FACTOR)], env={**os.environ, **ENV},
                    log_path=log).start()
    yield s
    s.stop()


@pytest.fixture(scope="module")
def server(launched, cases):
    """The server, ready. The offline reference (`cases`) runs while it boots."""
    return launched.wait_ready()


@pytest.fixture(scope="module")
def client(server):
    # max_retries=0: a retried request would hide a failure.
    return openai.OpenAI(base_url=server.base_url, api_key="none", max_retries=0, timeout=900)


def chat_ids(tok) -> list[int]:
    ids = tok.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=True)
    return list(ids["input_ids"] if hasattr(ids, "keys") else ids)


@pytest.fixture(scope="module")
def cases(launched, smol_model, tok):
    """Every default-suite prompt as token ids, and their offline outputs (one engine run,
    overlapping the server's start-up: both are mostly single-threaded imports)."""
    prompts = {"completion": [tok(p).input_ids for p in COMPLETIONS], "chat": [chat_ids(tok)],
               "load": text_excerpts(tok, *SMALL_LOAD, seed=1)}
    flat = [p for group in prompts.values() for p in group]
    outs = iter(offline(smol_model, flat))
    return {k: [(p, next(outs)) for p in group] for k, group in prompts.items()}


# ---- the plugin is what serves ---------------------------------------------

@served
def test_plugin_serves_yarn_in_the_model_process(server):
    log = server.log()
    lines = [ln for ln in log.splitlines()
             if "yarn_vllm: serving YaRN RoPE with YarnRotaryEmbedding" in ln]
    # the model runs in vLLM's worker process; the line carries its process prefix
    assert any("Worker" in ln or "EngineCore" in ln for ln in lines), log[-3000:]
    assert '"rope_type": "yarn"' in log and "max_model_len': 16384" in log


# ---- completion, chat, streaming, all against offline vLLM -------------------

@served
def test_completion_matches_offline(client, server, cases, tok):
    for text, (ids, ref) in zip(COMPLETIONS, cases["completion"]):
        r = client.completions.create(model=server.model, prompt=text, max_tokens=MAX_TOKENS,
                                      temperature=0, extra_body={"return_token_ids": True})
        c = r.choices[0]
        assert c.prompt_token_ids == ids  # the server tokenised as HF does
        assert c.token_ids == ref["token_ids"]
        assert c.text == ref["text"]
        assert r.usage.completion_tokens == len(ref["token_ids"])


@served
def test_chat_matches_offline(client, server, cases):
    ids, ref = cases["chat"][0]
    r = client.chat.completions.create(model=server.model, messages=CHAT, max_tokens=MAX_TOKENS,
                                       temperature=0, extra_body={"return_token_ids": True})
    c = r.choices[0]
    assert r.prompt_token_ids == ids  # the chat template as HF renders it
    assert c.token_ids == ref["token_ids"]
    assert c.message.content == ref["text"]


@served
def test_streaming_equals_non_streaming(client, server, cases):
    pieces = [ch.choices[0].text for ch in client.completions.create(
        model=server.model, prompt=COMPLETIONS[0], max_tokens=MAX_TOKENS, temperature=0,
        stream=True) if ch.choices]
    assert len(pieces) > 1  # it really streamed
    assert "".join(pieces) == cases["completion"][0][1]["text"]

    chat = [ch.choices[0].delta.content or "" for ch in client.chat.completions.create(
        model=server.model, messages=CHAT, max_tokens=MAX_TOKENS, temperature=0, stream=True)
        if ch.choices]
    assert "".join(chat) == cases["chat"][0][1]["text"]


# ---- bad input ---------------------------------------------------------------

@served
def test_over_long_prompt_is_400_naming_the_limit(client, server):
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=server.model, prompt=[100] * 16385, max_tokens=1)
    assert e.value.status_code == 400
    assert "maximum context length is 16384 tokens" in e.value.message


def _hostile(model: str) -> list[tuple[str, str, bytes, int, str]]:
    """(name, path, raw body, expected status, a word the message must contain)."""
    def body(**fields) -> bytes:
        return json.dumps({"model": model, **fields}).encode()

    chat = [{"role": "user", "content": "Hi"}]
    return [
        ("negative max_tokens", "completions", body(prompt="Hi", max_tokens=-1), 400,
         "max_tokens"),
        ("max_tokens a string", "completions", body(prompt="Hi", max_tokens="lots"), 400,
         "max_tokens"),
        ("huge n", "completions", body(prompt="Hi", max_tokens=2, n=10 ** 6), 400, "n must be"),
        ("invalid UTF-8 in the body", "completions",
         b'{"model": "' + model.encode() + b'", "prompt": "\xff\xfe\xfd", "max_tokens": 2}',
         400, "pars"),
        ("empty prompt", "completions", body(prompt="", max_tokens=2), 400, "prompt"),
        ("malformed JSON", "completions", b'{"model": "x", "prompt": ', 400, "JSON"),
        ("body is a JSON array", "completions", b"[1, 2, 3]", 400, "dictionary"),
        ("unknown model", "completions", json.dumps({"model": "no-such-model", "prompt": "Hi"})
         .encode(), 404, "does not exist"),
        ("huge logprobs", "completions", body(prompt="Hi", max_tokens=2, logprobs=10 ** 5), 400,
         "logprobs"),
        ("huge top_logprobs (chat)", "chat/completions",
         body(messages=chat, max_tokens=2, logprobs=True, top_logprobs=1000), 400, "logprobs"),
        ("messages not a list", "chat/completions", body(messages="Hi", max_tokens=2), 400,
         "messages"),
        ("max_tokens past the context", "completions", body(prompt="Hi", max_tokens=10 ** 5),
         400, "max_model_len"),
        ("negative temperature", "completions", body(prompt="Hi", max_tokens=2,
                                                     temperature=-3), 400, "temperature"),
        ("token id out of vocabulary", "completions", body(prompt=[99999999], max_tokens=2), 400,
         "vocabulary"),
        ("top_p NaN", "completions", b'{"model": "' + model.encode() +
         b'", "prompt": "Hi", "max_tokens": 2, "top_p": NaN}', 400, "top_p"),
    ]


def hostile_results(server) -> list[dict]:
    """Send each hostile request, then a valid one; what came back (also for the report)."""
    rows = []
    with httpx.Client(base_url=server.base_url, timeout=300) as http:
        for name, path, raw, want, word in _hostile(server.model):
            r = http.post(f"/{path}", content=raw, headers={"content-type": "application/json"})
            ok = http.post("/completions", json={"model": server.model, "prompt": "Hello",
                                                 "max_tokens": 1, "temperature": 0})
            body = r.json()
            message = (body.get("error") or {}).get("message") or body.get("detail") or ""
            rows.append({"input": name, "status": r.status_code, "want": want, "word": word,
                         "message": str(message), "then_valid": ok.status_code})
    return rows


@served
def test_hostile_inputs_get_clean_4xx_and_the_server_keeps_serving(server):
    rows = hostile_results(server)
    print("\n| input | status | message |\n|---|---|---|")
    for row in rows:
        print(f"| {row['input']} | {row['status']} | {row['message'][:160]} |".replace("\n", " "))
    assert len(rows) >= 8
    for row in rows:
        assert row["status"] == row["want"], row
        assert row["word"].lower() in row["message"].lower(), row
        assert "Traceback" not in row["message"], row
        assert row["then_valid"] == 200, row
    assert server.proc.poll() is None


# ---- load: concurrent requests, none lost or mixed up -------------------------

async def concurrent_completions(base_url: str, model: str, prompts: list[list[int]],
                                 max_tokens: int) -> tuple[list, list[float], float]:
    """All `prompts` at once; (choices, per-request latency in s, wall s)."""
    client = openai.AsyncOpenAI(base_url=base_url, api_key="none", max_retries=0, timeout=3600)

    async def one(p):
        t0 = time.perf_counter()
        r = await client.completions.create(model=model, prompt=p, max_tokens=max_tokens,
                                            temperature=0, extra_body={"return_token_ids": True})
        return r.choices[0], time.perf_counter() - t0

    t0 = time.perf_counter()
    results = await asyncio.gather(*(one(p) for p in prompts))
    wall = time.perf_counter() - t0
    await client.close()
    return [c for c, _ in results], [s for _, s in results], wall


def check_load(server, pairs: list[tuple[list[int], dict]]) -> dict:
    prompts = [p for p, _ in pairs]
    choices, latency, wall = asyncio.run(
        concurrent_completions(server.base_url, server.model, prompts, MAX_TOKENS))
    assert len(choices) == len(prompts)
    for (prompt, ref), c in zip(pairs, choices):
        assert c.prompt_token_ids == prompt  # this answer belongs to this prompt
        assert c.token_ids == ref["token_ids"] and c.text == ref["text"]
    assert len({c.text for c in choices}) > 1  # distinct answers: a mix-up would show
    p50, p90, p99 = np.percentile(latency, [50, 90, 99])
    stats = {"requests": len(prompts), "prompt_tokens": [min(map(len, prompts)),
                                                         max(map(len, prompts))],
             "max_tokens": MAX_TOKENS, "wall_s": round(wall, 2), "p50_s": round(p50, 2),
             "p90_s": round(p90, 2), "p99_s": round(p99, 2)}
    print(f"\nload: {json.dumps(stats)}")
    return stats


@served
def test_concurrent_requests_small(server, cases):
    check_load(server, cases["load"])


@pytest.mark.slow
def test_32_concurrent_long_prompts(server, smol_model, tok):
    """32 requests at once with 2k-4k-token prompts; each equals its offline greedy output."""
    prompts = text_excerpts(tok, 32, 2000, 4000, seed=2)
    t0 = time.perf_counter()
    refs = offline(smol_model, prompts, timeout=4 * 3600)  # ~100k prompt tokens on 1 core
    offline_s = time.perf_counter() - t0
    stats = check_load(server, list(zip(prompts, refs)))
    stats["offline_reference_s"] = round(offline_s, 1)
    os.makedirs("results", exist_ok=True)
    with open("results/serve_load.json", "w") as f:
        json.dump(stats, f, indent=2)
