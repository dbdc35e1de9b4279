"""Request mode on the real CPU engine when a request outgrows its scale: open-ended
admission, escalation by recompute, scale-keyed prefix caching, and preemption.

A random tiny Llama trained to L = 256 is served with factor 4 (scales 1, 2, 4; 1,024
positions) and a reserve of 0, so the boundary is exact: the token at sequence index p
is produced by the forward whose last fed position is p - 1, at the smallest listed s
with s x L >= p. An open-ended 240-token prompt run to the end of the context must
therefore give tokens 240-256 as trained, 257-512 at s = 2 and 513-1023 at s = 4, each
equal to HF transformers teacher-forced over the final sequence at that scale, and far
from the neighbouring scale. Two engines, started side by side (tests/escalation_worker.py):

  escalate  prefix caching on, a 64-token budget (every recompute is chunked), the growing
            request beside bounded requests at s = 1, 2 and an own yarn_factor 3; then
            requests sharing the escalated request's prefix at s = 4 and at s = 2; then
            clients forging cache salts at one scale against honest requests at another;
  preempt   the same growing request beside two neighbours at s = 1 and s = 2 in a KV
            cache of 33 blocks of 32 (the least vLLM takes for max_model_len), so vLLM must preempt.
"""

from __future__ import annotations

import json
import os
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

import hf_reference
from escalation_worker import MODULE, worker_env
from yarn_vllm.yarn.config import YarnConfig

L, FACTOR, MAX_LEN = 256, 4.0, 1024
LOGPROB_TOL = 1e-4  # fp32 engine against fp32 HF; the neighbouring scale is > 100x off
TIE = 1e-3  # top-two logprobs this close may swap under another summation order
GROW = 240
BLOCK = 32  # the smallest block CPU_ATTN takes


def _tokens(n: int, seed: int) -> list[int]:
    return torch.randint(2, 512, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def scale_at(p: int) -> float:
    """The scale that must produce the token at sequence index p (reserve 0)."""
    return next(s for s in (1.0, 2.0, 4.0) if s * L >= p)


SYSTEM, SYSTEM_2 = _tokens(128, 50), _tokens(128, 51)  # shared "system prompts"


def _bounded(name, prompt, max_tokens, **extra):
    sampling = {"max_tokens": max_tokens}
    if extra.get("yarn_factor") is not None:
        sampling["extra_args"] = {"yarn_factor": extra.pop("yarn_factor")}
    return {"name": name, "prompt_token_ids": prompt, "sampling": sampling, **extra}


ESCALATE_BATCHES = [
    [{"name": "grow", "prompt_token_ids": _tokens(GROW, 1), "sampling": {"max_tokens": None}},
     _bounded("beside_s1", _tokens(100, 2), 20), _bounded("beside_s2", _tokens(300, 3), 20),
     _bounded("beside_own", _tokens(100, 4), 20, yarn_factor=3.0)],
    # the escalated request's own blocks: at s = 4 (its last scale) and s = 2 (its middle one)
    [{"name": "share_s4", "prefix_of": "grow", "length": 700, "sampling": {"max_tokens": 8}},
     {"name": "share_s2", "prefix_of": "grow", "length": 450,
      "sampling": {"max_tokens": 8, "extra_args": {"yarn_factor": 2.0}}}],
    # forged salts: each attacker first, then its victim at another scale
    [_bounded("attacker_s1", SYSTEM + _tokens(100, 60), 8, cache_salt="yarn_factor=2.0")],
    [_bounded("victim_s2", SYSTEM + _tokens(200, 61), 8)],
    [_bounded("victim_s2_again", SYSTEM + _tokens(200, 61), 8)],
    [_bounded("attacker_s2", SYSTEM_2 + _tokens(300, 62), 8)],
    [_bounded("victim_s1", SYSTEM_2 + _tokens(100, 63), 8, cache_salt="yarn_factor=2.0")],
    [_bounded("attacker_tenant_s1", SYSTEM + _tokens(90, 64), 8,
              cache_salt="tenant|yarn_factor=4.0")],
    [_bounded("victim_tenant_s4", SYSTEM + _tokens(600, 65), 8, cache_salt="tenant")],
]
SCALE_OF = {"beside_s1": 1.0, "beside_s2": 2.0, "beside_own": 3.0, "share_s4": 4.0,
            "share_s2": 2.0, "attacker_s1": 1.0, "victim_s2": 2.0, "victim_s2_again": 2.0,
            "attacker_s2": 2.0, "victim_s1": 1.0, "attacker_tenant_s1": 1.0,
            "victim_tenant_s4": 4.0, "neighbour_s1": 1.0, "neighbour_s2": 2.0}
NEIGHBOUR = {1.0: 2.0, 2.0: 4.0, 3.0: 4.0, 4.0: 2.0}


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    from yarn_vllm.tools.testing.tiny_model import make_tiny_llama

    return make_tiny_llama(str(tmp_path_factory.mktemp("tiny_llama_256")),
                           original_max_position=L)


@pytest.fixture(scope="module")
def runs(model):
    from yarn_vllm.tools.engine_worker import run_worker

    hf = json.load(open(os.path.join(model, "config.json")))
    overrides = YarnConfig(factor=FACTOR, mode="request", request_reserve=0).hf_overrides(hf)
    common = {"dtype": "float32", "hf_overrides": overrides, "skip_tokenizer_init": True,
              "max_model_len": MAX_LEN, "enable_prefix_caching": True,
              "enable_chunked_prefill": True, "max_num_batched_tokens": 64, "max_num_seqs": 8,
              "block_size": BLOCK, "disable_log_stats": False}
    escalate = {"model": model, "llm_kwargs": common, "batches": ESCALATE_BATCHES}
    preempt = {"model": model, "llm_kwargs": dict(common, num_gpu_blocks_override=MAX_LEN // BLOCK + 1),
               "batches": [[{"name": "grow", "prompt_token_ids": _tokens(GROW, 1),
                             "sampling": {"max_tokens": None}},
                            _bounded("neighbour_s2", _tokens(300, 7), 200),
                            _bounded("neighbour_s1", _tokens(100, 8), 156)]]}
    with ThreadPoolExecutor(2) as pool:
        jobs = {name: pool.submit(run_worker, MODULE, spec, env=worker_env(), timeout=1200)
                for name, spec in (("escalate", escalate), ("preempt", preempt))}
        return {name: job.result() for name, job in jobs.items()}


def hf_logprobs(model: str, sequence: list[int], s: float) -> torch.Tensor:
    return hf_reference.hf_logprobs(model, sequence, s, L)


def step_gaps(model: str, out: dict, scale_of_index) -> tuple[list[float], list[float]]:
    """Per generated token: |engine logprob - HF's at the scale that produced it| and the same
    against the neighbouring scale (the contrast). Every step is compared: the sequence is the
    engine's own, so HF scores the token the engine took even where the two would part; where
    the engine's token is not HF's greedy one, the two must be a near-tie."""
    sequence = out["prompt"] + out["token_ids"]
    p0 = len(out["prompt"])
    scales = [scale_of_index(p0 + i) for i in range(len(out["token_ids"]))]
    tables = {s: hf_logprobs(model, sequence, s) for s in set(scales) | {
        NEIGHBOUR[s] for s in scales}}
    gaps, contrast = [], []
    for i, (token, lp, s) in enumerate(zip(out["token_ids"], out["logprobs"], scales)):
        row = tables[s][p0 + i - 1]
        assert row.max() - row[token] < TIE, f"token {p0 + i}: not HF's greedy choice at s={s}"
        gaps.append(abs(lp - row[token].item()))
        contrast.append(abs(lp - tables[NEIGHBOUR[s]][p0 + i - 1][token].item()))
    return gaps, contrast


def _assert_exact_with_contrast(gaps, contrast):
    assert max(gaps) < LOGPROB_TOL
    assert max(contrast) > 100 * LOGPROB_TOL


@pytest.mark.parametrize("engine", ["escalate", "preempt"])
def test_open_ended_request_escalates_twice_at_the_exact_boundaries(runs, engine):
    result = runs[engine]
    grow = result["outputs"]["grow"]
    assert len(grow["prompt"]) + len(grow["token_ids"]) == MAX_LEN  # ran to the context's end
    assert grow["scale"] == 4.0
    escalations = [(e["old"], e["new"], e["num_tokens"]) for e in result["escalations"]
                   if e["name"] == "grow"]
    assert escalations == [(1.0, 2.0, L + 1), (2.0, 4.0, 2 * L + 1)]
    recomputed = [e["recomputed"] for e in result["escalations"] if e["name"] == "grow"]
    assert recomputed == [L, 2 * L]  # everything so far, prompt and output alike


@pytest.mark.parametrize("engine", ["escalate", "preempt"])
@pytest.mark.parametrize("segment", [(GROW, L), (L + 1, 2 * L), (2 * L + 1, MAX_LEN - 1)])
def test_each_token_equals_hf_at_the_scale_in_force_when_it_was_produced(runs, model, engine,
                                                                         segment):
    """As trained, then s = 2, then s = 4; each segment far from its neighbouring scale."""
    grow = runs[engine]["outputs"]["grow"]
    gaps, contrast = step_gaps(model, grow, scale_at)
    lo, hi = segment
    start = len(grow["prompt"])
    _assert_exact_with_contrast(gaps[lo - start: hi - start + 1],
                                contrast[lo - start: hi - start + 1])


@pytest.mark.parametrize("name", ["beside_s1", "beside_s2", "beside_own", "share_s4",
                                  "share_s2"])
def test_requests_beside_and_after_the_escalation_keep_their_own_scale(runs, model, name):
    out = runs["escalate"]["outputs"][name]
    assert out["scale"] == SCALE_OF[name]
    _assert_exact_with_contrast(*step_gaps(model, out, lambda p: SCALE_OF[name]))


def test_a_request_at_the_new_scale_hits_the_escalated_requests_blocks(runs):
    outputs = runs["escalate"]["outputs"]
    assert outputs["share_s4"]["num_cached_tokens"] >= 700 - 2 * BLOCK  # grow's s = 4 blocks
    # grow's blocks from its s = 2 phase stay cached under their s = 2 key, and are exact
    assert outputs["share_s2"]["num_cached_tokens"] >= 450 - 2 * BLOCK


@pytest.mark.parametrize("victim,attacker", [("victim_s2", "attacker_s1"),
                                             ("victim_s1", "attacker_s2"),
                                             ("victim_tenant_s4", "attacker_tenant_s1")])
def test_no_client_salt_reaches_another_scales_blocks(runs, model, victim, attacker):
    """A client at one scale whose cache_salt spells another scale's old salt shares a system
    prompt with an honest request at that scale: the honest one hits none of its blocks, and
    equals HF at its own scale. (Before: 896 tokens hit, output 6.9 nats off.)"""
    outputs = runs["escalate"]["outputs"]
    assert outputs[attacker]["scale"] != outputs[victim]["scale"] == SCALE_OF[victim]
    assert outputs[victim]["num_cached_tokens"] == 0
    _assert_exact_with_contrast(*step_gaps(model, outputs[victim], lambda p: SCALE_OF[victim]))


def test_the_same_scale_still_shares_blocks(runs):
    """The contrast to the forged salts: the honest request's repeat hits its blocks."""
    assert runs["escalate"]["outputs"]["victim_s2_again"]["num_cached_tokens"] >= 328 - 2 * BLOCK


def test_a_preempted_request_resumes_at_its_current_scale(runs, model):
    """In a cache of exactly max_model_len, vLLM preempts (not by escalation). The request it
    preempted and its neighbour at another scale equal HF at every token's scale."""
    result = runs["preempt"]
    by_memory = [p for p in result["preemptions"] if not p["escalation"]]
    assert by_memory, "the scenario must make vLLM preempt"
    victims = {p["name"] for p in by_memory}
    assert victims <= {"grow", "neighbour_s1", "neighbour_s2"}
    for name in ("grow", "neighbour_s1", "neighbour_s2"):
        out = result["outputs"][name]
        gaps, contrast = step_gaps(model, out, scale_at if name == "grow"
                                   else (lambda p, s=SCALE_OF[name]: s))
        _assert_exact_with_contrast(gaps, contrast)
    for p in by_memory:  # each was preempted at the scale it then resumed at
        if p["name"] == "grow":
            assert p["scale"] == scale_at(p["num_tokens"])
