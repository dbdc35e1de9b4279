"""Request mode served through `yarn-vllm serve` and the real `openai` client, default tier.

The tiny Llama (trained to L = 1,024, factor 4) gets a byte-level tokenizer with a chat
template (yarn_vllm.tools.testing.tiny_model.add_tiny_tokenizer), so the server takes chat
requests as a chat client sends them: without max_tokens. vLLM's chat handler then fills
max_tokens with max_model_len - prompt; request mode must still see an open-ended request
and serve this short one as trained (s = 1), not at s = 4. References: HF transformers
teacher-forced over the served tokens, at the scale that must serve them and at the
neighbouring one (the contrast).
"""

from __future__ import annotations

import json
import math
import os

import httpx
import openai
import pytest
import torch

import hf_reference
from yarn_vllm.tools.testing.server_process import LocalServer

L, FACTOR = 1024, 4.0
LOGPROB_TOL = 1e-4
ENV = {"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CPU_NUM_OF_RESERVED_CPU": "1"}
MESSAGES = [{"role": "user", "content": "Tell me a long story about the sea, please."}]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    from yarn_vllm.tools.testing.tiny_model import add_tiny_tokenizer, make_tiny_llama

    return add_tiny_tokenizer(make_tiny_llama(str(tmp_path_factory.mktemp("tiny_chat"))))


@pytest.fixture(scope="module")
def server(model, tmp_path_factory):
    log = tmp_path_factory.mktemp("served") / "request.log"
    args = ["--factor", str(FACTOR), "--yarn-mode", "request", "--dtype", "float32",
            "--max-num-batched-tokens", "1024"]
    started = LocalServer(model, args, env={**os.environ, **ENV}, log_path=str(log)).start()
    try:
        yield started.wait_ready()
    finally:
        started.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.base_url, api_key="none", max_retries=0)


def hf_logprobs(model: str, ids: list[int], s: float) -> torch.Tensor:
    return hf_reference.hf_logprobs(model, ids, s, L)


def _gaps(model, prompt: list[int], tokens: list[int], logprobs: list[float], s: float):
    table = hf_logprobs(model, prompt + tokens, s)
    p = len(prompt)
    return [abs(lp - table[p + i - 1][t].item()) for i, (t, lp) in enumerate(zip(tokens, logprobs))]


def _token_id(text: str) -> int:
    assert text.startswith("token_id:"), text
    return int(text.removeprefix("token_id:"))


def test_chat_without_max_tokens_streams_as_trained(model, client):
    """The chat client's usual request: streamed, no max_tokens. A stop token the model says
    a few dozen tokens in (found with HF first) ends it, so the request stays open-ended."""
    from transformers import AutoTokenizer

    prompt = AutoTokenizer.from_pretrained(model).apply_chat_template(
        MESSAGES, add_generation_prompt=True, tokenize=True, return_dict=False)
    greedy = hf_logprobs(model, prompt, 1.0)[-1:].argmax(-1).tolist()
    for _ in range(40):  # HF's own greedy continuation, as trained
        greedy.append(int(hf_logprobs(model, prompt + greedy, 1.0)[-1].argmax()))
    stop = next(t for i, t in enumerate(greedy) if i >= 24 and t not in greedy[:i])
    stream = client.chat.completions.create(
        model=model, messages=MESSAGES, stream=True, temperature=0, logprobs=True,
        extra_body={"stop_token_ids": [stop], "return_tokens_as_token_ids": True,
                    "skip_special_tokens": False})
    tokens, logprobs = [], []
    for chunk in stream:
        for choice in chunk.choices:
            for item in (choice.logprobs.content or []) if choice.logprobs else []:
                tokens.append(_token_id(item.token))
                logprobs.append(item.logprob)
    produced = tokens[:-1] if tokens and tokens[-1] == stop else tokens
    assert produced == greedy[:len(produced)] and len(produced) >= 24
    gaps = _gaps(model, prompt, tokens, logprobs, 1.0)
    assert max(gaps) < LOGPROB_TOL
    # the contrast: s = 2, the scale a reserve past L would have given it, is far off (and
    # s = 4 is what vLLM's filled-in max_tokens would have given it)
    assert max(_gaps(model, prompt, tokens, logprobs, 2.0)) > 100 * LOGPROB_TOL


def test_vllm_xargs_override_serves_its_own_scale(model, client):
    prompt = torch.randint(2, 512, (300,), generator=torch.Generator().manual_seed(3)).tolist()
    out = client.completions.create(model=model, prompt=prompt, max_tokens=6, temperature=0,
                                    logprobs=1, extra_body={"vllm_xargs": {"yarn_factor": 3},
                                                            "return_tokens_as_token_ids": True})
    lp = out.choices[0].logprobs
    tokens = [_token_id(t) for t in lp.tokens]
    assert max(_gaps(model, prompt, tokens, lp.token_logprobs, 3.0)) < LOGPROB_TOL
    assert max(_gaps(model, prompt, tokens, lp.token_logprobs, 4.0)) > 100 * LOGPROB_TOL


@pytest.mark.parametrize("value", ["2", True, False, 0.5, 9, -1, None])
def test_bad_yarn_factor_is_a_400_naming_it(client, model, value):
    body = {"model": model, "prompt": [5, 6, 7], "max_tokens": 2,
            "vllm_xargs": {"yarn_factor": value}}
    if value is None:  # NaN: not JSON, but Python's json and some clients send it
        raw = json.dumps(dict(body, vllm_xargs={"yarn_factor": math.nan}))
        response = httpx.post(f"{client.base_url}completions", content=raw,
                              headers={"content-type": "application/json"}, timeout=60)
        assert response.status_code == 400, response.text
        return
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(**{k: v for k, v in body.items() if k != "vllm_xargs"},
                                  extra_body={"vllm_xargs": body["vllm_xargs"]})
    assert e.value.status_code == 400 and "yarn_factor" in str(e.value)


def test_out_of_vocabulary_token_id_is_a_400_naming_it(client, model):
    """(With a tokenizer vLLM refuses it itself; without one, admission does:
    test_request_mode.py's token-id test.)"""
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=model, prompt=[5, 6, 600], max_tokens=2)
    assert e.value.status_code == 400 and "token id 600" in str(e.value).lower()


def test_the_server_is_still_serving(client, model):
    """After every refusal above (this module's order), a plain request is answered."""
    out = client.completions.create(model=model, prompt=[5, 6, 7], max_tokens=3, temperature=0)
    assert len(out.choices[0].text) >= 0 and out.usage.completion_tokens == 3
