"""`generate --replicas N`: a batch over N engine replicas in Ray actors equals one engine."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest

from yarn_vllm.tools.cpu import core_groups, shards
from yarn_vllm.tools.replicas import generate_replicated


def test_shards_cover_the_batch_in_order():
    for n_items in range(0, 12):
        for n in range(1, 5):
            parts = shards(n_items, n)
            assert [i for p in parts for i in p] == list(range(n_items))
            sizes = [len(p) for p in parts]
            assert len(parts) == min(n, n_items) and (not sizes or max(sizes) - min(sizes) <= 1)


def test_core_groups_are_disjoint():
    assert core_groups(2, [0, 1]) == [[0], [1]]
    assert core_groups(2, [4, 3, 2, 1, 0]) == [[0, 1, 2], [3, 4]]  # replicas: every core
    assert core_groups(2, [0, 1, 2, 3, 4], equal=True) == [[0, 1], [2, 3]]  # TP ranks: equal
    assert core_groups(3, [0, 1]) is None  # more workers than cores: no pinning


@pytest.mark.slow  # three tiny engines: ~60 s on an idle 2-core machine
def test_two_replicas_equal_one_engine(ray_cluster, tiny_llama, monkeypatch):
    """Greedy tokens of 2 replicas, put back in input order, equal one engine's, with prompts
    past the tiny model's 1,024 trained positions (YaRN s=2)."""
    from transformers import AutoConfig

    from yarn_vllm.yarn.config import YarnConfig
    from yarn_vllm.tools.cpu import apply_cpu_defaults
    from yarn_vllm.tools.engine_worker import run_engine

    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "1")
    overrides = YarnConfig(factor=2.0).hf_overrides(AutoConfig.from_pretrained(tiny_llama).to_dict())
    kwargs = {"hf_overrides": overrides, "max_model_len": 2048, "skip_tokenizer_init": True,
              "seed": 0}
    apply_cpu_defaults(kwargs)
    rng = random.Random(3)
    prompts = [[rng.randrange(2, 512) for _ in range(n)] for n in (40, 1500, 300, 1100, 7)]
    sampling = {"temperature": 0.0, "max_tokens": 8, "ignore_eos": True, "detokenize": False}
    with ThreadPoolExecutor(1) as pool:  # the reference engine runs beside the replicas
        ref = pool.submit(run_engine, {"model": tiny_llama, "llm_kwargs": kwargs,
                                       "prompts": prompts, "sampling": sampling,
                                       "introspect": False})
        got = generate_replicated(tiny_llama, kwargs, prompts, sampling, 2, log=lambda *_: None)
        want = ref.result()
    assert [g["prompt_token_ids"] for g in got] == prompts
    assert [g["token_ids"] for g in got] == [o["token_ids"] for o in want["outputs"]]
    assert all(len(g["token_ids"]) == 8 for g in got)


@pytest.mark.slow
def test_cli_generate_replicas_matches_single(smol_model, tmp_path):
    """`yarn-vllm generate --replicas 2` writes the same rows, in order, as one engine."""
    prompts = ["The capital of France is", "Write a haiku about rain:", "1, 2, 3, 4,"]
    common = [sys.executable, "-m", "yarn_vllm.tools.cli", "generate", "--model", smol_model,
              "--factor", "2", "--max-tokens", "8"] + [a for p in prompts for a in ("--prompt", p)]
    rows = {}
    for name, extra in (("one", []), ("two", ["--replicas", "2"])):
        out = tmp_path / f"{name}.jsonl"
        proc = subprocess.run(common + ["--output", str(out)] + extra, capture_output=True,
                              text=True, timeout=1200)
        assert proc.returncode == 0, proc.stderr[-3000:]
        rows[name] = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["text"] for r in rows["two"]] == [r["text"] for r in rows["one"]]
    assert [r["index"] for r in rows["two"]] == [0, 1, 2]
