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


# ---- TP 2 outside serve: the offline engines of generate, eval, bench and sweeps --------------

# fp32: the random tiny model's top logits lie within ~0.1 nat of each other (2,600-token
# prompt: -5.79, -5.88, -5.94), so bf16 rounding of TP's all-reduce picks another token in
# static and request mode while fp32 TP 2 matches TP 1 to 1e-6 in logprob (measured here)
DTYPE = "float32"


@pytest.mark.slow  # two or three tiny engines, TP 2 on both cores: ~3-5 min on 2 shared cores
@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="TP 2 on CPU needs 2 cores")
@pytest.mark.parametrize("mode", ["request", "dynamic"])
def test_tp2_offline_matches_tp1(tiny_with_tokenizer, tmp_path, mode):
    """The engine worker (eval, bench and sweeps run their engines through it) and, in
    dynamic mode, `yarn-vllm generate` take --tensor-parallel-size 2 on the CPU: the one
    engine builder binds a core per rank, as serve does, and the greedy tokens equal TP 1's."""
    import subprocess
    import sys

    from yarn_vllm.tools.engine_worker import run_engine

    model = tiny_with_tokenizer
    hf = json.load(open(os.path.join(model, "config.json")))
    rng = np.random.default_rng(5)
    prompts = [rng.integers(3, hf["vocab_size"], n).tolist() for n in (900, 2600)]
    env = {k: v for k, v in os.environ.items() if k != "VLLM_CPU_OMP_THREADS_BIND"}
    overrides = YarnConfig(factor=FACTOR, mode=mode).hf_overrides(hf)
    outputs = {}
    for tp in (1, 2):
        outputs[tp] = run_engine(
            {"model": model, "prompts": prompts, "introspect": False,
             "llm_kwargs": {"hf_overrides": overrides, "tensor_parallel_size": tp,
                            "max_model_len": overrides["max_position_embeddings"],
                            "dtype": DTYPE},
             # as `generate` samples: greedy, stopping at EOS
             "sampling": {"max_tokens": MAX_TOKENS, "ignore_eos": False}},
            in_process=True, env=env, timeout=1800)["outputs"]
    assert [o["token_ids"] for o in outputs[2]] == [o["token_ids"] for o in outputs[1]]
    if mode != "dynamic":
        return
    # the command line: `generate` with TP 2 writes TP 1's text
    prompts_file = tmp_path / "prompts.jsonl"
    prompts_file.write_text(json.dumps({"prompt": "", "prompt_token_ids": prompts[1]}) + "\n")
    out = tmp_path / "tp2.jsonl"
    proc = subprocess.run([sys.executable, "-m", "yarn_vllm.tools.cli", "generate", "--model",
                           model, "--prompts-file", str(prompts_file), "--factor", str(FACTOR),
                           "--yarn-mode", mode, "--max-tokens", str(MAX_TOKENS),
                           "--tensor-parallel-size", "2", "--dtype", DTYPE, "--output",
                           str(out)],
                          capture_output=True, text=True, timeout=1800, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    [row] = [json.loads(line) for line in out.read_text().splitlines()]
    assert row["text"] == outputs[1][1]["text"] and row["prompt_tokens"] == len(prompts[1])
