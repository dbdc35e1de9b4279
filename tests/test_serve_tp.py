"""Tensor parallelism through `yarn-vllm serve`: TP 2 (mp executor) gives TP 1's greedy tokens.

The model is the tiny random Llama (4 query / 2 KV heads, so it splits over 2 ranks;
SmolLM2's 9 / 3 heads do not) with SmolLM2's tokenizer, so vLLM's OpenAI server can
run it. YaRN s=4 and prompts past its trained 1,024 positions.
"""

from __future__ import annotations

import json
import os

import numpy as np
import openai
import pytest

from yarn_vllm.yarn.config import YarnConfig
from yarn_vllm.tools.engine_worker import run_engine
from yarn_vllm.tools.testing.server_process import LocalServer

FACTOR, MAX_TOKENS = 4.0, 32


@pytest.fixture(scope="module")
def tiny_with_tokenizer(smol_model, tmp_path_factory):
    from transformers import AutoTokenizer

    from yarn_vllm.tools.testing.tiny_model import make_tiny_llama

    tok = AutoTokenizer.from_pretrained(smol_model)
    path = make_tiny_llama(str(tmp_path_factory.mktemp("tiny_tok")), vocab_size=len(tok))
    tok.save_pretrained(path)
    return path


@pytest.mark.slow
@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="TP 2 on CPU needs 2 cores")
def test_tp2_mp_served_matches_tp1_offline(tiny_with_tokenizer):
    model = tiny_with_tokenizer
    hf = json.load(open(os.path.join(model, "config.json")))
    rng = np.random.default_rng(3)
    prompts = [rng.integers(3, hf["vocab_size"], n).tolist() for n in (1500, 2500, 3500)]
    overrides = YarnConfig(factor=FACTOR).hf_overrides(hf)
    ref = run_engine({"model": model, "prompts": prompts,
                      "llm_kwargs": {"hf_overrides": overrides,
                                     "max_model_len": overrides["max_position_embeddings"]},
                      "sampling": {"max_tokens": MAX_TOKENS}}, timeout=1800)["outputs"]

    args = ["--factor", str(FACTOR), "--tensor-parallel-size", "2",
            "--distributed-executor-backend", "mp"]
    with LocalServer(model, args) as server:
        client = openai.OpenAI(base_url=server.base_url, api_key="none", max_retries=0,
                               timeout=1800)
        served = [client.completions.create(
            model=model, prompt=p, max_tokens=MAX_TOKENS, temperature=0,
            extra_body={"ignore_eos": True, "return_token_ids": True}).choices[0]
            for p in prompts]
        log = server.log()
    assert "world_size=2" in log  # two ranks really ran
    for s, r in zip(served, ref):
        assert s.token_ids == r["token_ids"]
