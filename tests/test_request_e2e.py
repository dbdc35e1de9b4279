"""Request mode end to end on the real vLLM engine (CPU), against independent references.

A random tiny Llama trained to L = 1024 is served with factor 4, so a request gets
s = 1, 2 or 4 at admission (the smallest with s x L >= prompt + max_tokens), or its
own `yarn_factor`. Each request must equal its reference at that scale: HF
transformers (as trained at s = 1, its own YaRN at s = 2 and 3) and vLLM with our
plugin off (static YaRN at s = 4). Engines:

  one_step   prefix caching on, a token budget that prefills every prompt in one step;
             three sequential batches: a mixed batch, then prompts sharing prefixes
             with it at the same and at another scale, then a repeat at s = 4;
  chunked    a 256-token budget (chunked prefill) and a KV cache too small for its
             second batch, so that vLLM preempts and recomputes requests;
  vllm_s4    plugin off, static YaRN s = 4.
"""

from __future__ import annotations

import json
import os

import pytest
import torch

import hf_reference as hf
from conftest import run_engines
from yarn_vllm.yarn.config import YarnConfig

L, NEW = 1024, 8
LOGPROB_TOL = 1e-4  # fp32 engine against fp32 references; a wrong scale is off by > 1e-2
TIE = 1e-3  # two tokens this close are a tie that summation order may break either way


def _tokens(vocab: int, n: int, seed: int) -> list[int]:
    return torch.randint(2, vocab, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


@pytest.fixture(scope="session")
def case(tiny_llama):
    hf = json.load(open(os.path.join(tiny_llama, "config.json")))
    v = hf["vocab_size"]
    short, mid, long_, own = _tokens(v, 300, 1), _tokens(v, 1500, 2), _tokens(v, 3000, 3), \
        _tokens(v, 300, 4)
    p = {  # name: (prompt, extra_args, the scale admission must give it)
        "short": (short, None, 1.0), "mid": (mid, None, 2.0), "long": (long_, None, 4.0),
        "own": (own, {"yarn_factor": 3.0}, 3.0),
        # batch 2: prefixes of batch 1's prompts
        "mid_again": (mid[:1280] + _tokens(v, 200, 5), None, 2.0),
        "mid_other_scale": (mid[:1280] + _tokens(v, 200, 6), {"yarn_factor": 4}, 4.0),
        "short_again": (short[:256] + _tokens(v, 100, 7), None, 1.0),
        # batch 3: batch 2's prompt at s = 4 again
        "mid_other_scale_again": (mid[:1280] + _tokens(v, 200, 6), {"yarn_factor": 4}, 4.0),
        # the chunked engine's second batch: 32 blocks of 128 needed, 26 there
        "grow_a": (_tokens(v, 1100, 8), None, 2.0), "grow_b": (_tokens(v, 200, 9), None, 1.0),
        "grow_c": (_tokens(v, 1400, 10), None, 2.0),
    }
    overrides = YarnConfig(factor=4.0, mode="request").hf_overrides(hf)
    base = {"dtype": "float32", "hf_overrides": overrides, "skip_tokenizer_init": True,
            "max_model_len": 3200, "seed": 0}
    return {"model": tiny_llama, "hf": hf, "prompts": p, "llm_kwargs": base}


BATCH_1 = ("short", "mid", "long", "own")
BATCH_2 = ("mid_again", "mid_other_scale", "short_again")
GROW = ("grow_a", "grow_b", "grow_c")
GROW_TOKENS = 400


def _request(case, name, **sampling):
    prompt, extra, _ = case["prompts"][name]
    sampling = dict(sampling, extra_args=extra) if extra else sampling
    return {"prompt_token_ids": prompt, "sampling": sampling}


@pytest.fixture(scope="session")
def engines(case):
    """The three engines below, started side by side."""
    hf = case["hf"]
    one_step = {"model": case["model"],
                "prompts": [_request(case, n, prompt_logprobs=1) for n in BATCH_1],
                "batches": [[_request(case, n) for n in BATCH_2],
                            [_request(case, "mid_other_scale_again")]],
                "sampling": {"max_tokens": NEW, "logprobs": 1, "detokenize": False},
                "llm_kwargs": dict(case["llm_kwargs"], enable_prefix_caching=True,
                                   max_num_batched_tokens=8192)}
    chunked = {"model": case["model"],
               "prompts": [_request(case, n, prompt_logprobs=1) for n in BATCH_1],
               "batches": [[_request(case, n, max_tokens=GROW_TOKENS) for n in GROW]],
               "sampling": {"max_tokens": NEW, "logprobs": 1, "detokenize": False},
               "llm_kwargs": dict(case["llm_kwargs"], enable_prefix_caching=False,
                                  enable_chunked_prefill=True, max_num_batched_tokens=256,
                                  num_gpu_blocks_override=26, disable_log_stats=False)}
    vllm_s4 = {"model": case["model"],
               "prompts": [case["prompts"][n][0] for n in VLLM_S4],
               "sampling": {"max_tokens": NEW, "logprobs": 1, "prompt_logprobs": 1,
                            "detokenize": False},
               "llm_kwargs": dict(case["llm_kwargs"],
                                  hf_overrides=YarnConfig(factor=4.0).hf_overrides(hf))}
    return run_engines({
        # vLLM's own engine-core process, unlike the other two: admission writes the
        # scale in the frontend, and it must reach the core's runner through vLLM's IPC
        "one_step": dict(spec=one_step, timeout=900),
        "chunked": dict(spec=chunked, timeout=900, in_process=True),
        "vllm_s4": dict(spec=vllm_s4, plugins=False, timeout=900, in_process=True)})


@pytest.fixture(scope="session")
def one_step(engines):
    out = engines["one_step"]
    return dict(zip(BATCH_1 + BATCH_2 + ("mid_other_scale_again",), out["outputs"])), out


@pytest.fixture(scope="session")
def chunked(engines):
    out = engines["chunked"]
    return dict(zip(BATCH_1 + GROW, out["outputs"])), out


VLLM_S4 = ("long", "mid_other_scale")


@pytest.fixture(scope="session")
def vllm_s4(engines):
    out = engines["vllm_s4"]
    assert out["rotary_classes"] == [
        "vllm.model_executor.layers.rotary_embedding.yarn_scaling_rope.YaRNScalingRotaryEmbedding"]
    return dict(zip(VLLM_S4, out["outputs"]))


def hf_reference(case, name: str, s: float, continuation: list[int]):
    """HF transformers at scale s (plain RoPE at s = 1), one forward over the prompt and
    `continuation` (the engine's tokens): the prompt's per-token logprobs [P - 1], the
    greedy token after each prefix, and each step's log-softmax [len(continuation), vocab].

    Teacher forcing over the engine's own tokens scores every step the engine took, in one
    pass (assert_steps_match).
    """
    prompt = case["prompts"][name][0]
    ids = torch.tensor([prompt + list(continuation)])
    lp = hf.hf_logprobs(case["model"], ids[0].tolist(), s, L)
    p = len(prompt)
    prompt_lp = lp[:p - 1].gather(1, ids[0, 1:p, None])[:, 0]
    steps = lp[p - 1:p - 1 + len(continuation)]
    return prompt_lp, steps.argmax(-1).tolist(), steps


def prompt_logprob_gap(ours: dict, prompt: list[int], reference: torch.Tensor) -> float:
    """Largest |ours - reference| over the prompt's own tokens (positions 1 .. P-1)."""
    got = torch.tensor([step[str(token)] for step, token in
                        zip(ours["prompt_logprobs"][1:], prompt[1:])])
    return (got - reference).abs().max().item()


NEIGHBOURS = {1.0: (2.0,), 2.0: (1.0, 4.0), 3.0: (2.0, 4.0), 4.0: (2.0,)}


def assert_far_from_neighbours(case, name: str, ours: dict, s: float | None = None) -> None:
    """The contrast: at each neighbouring scale HF's prompt logprobs (or, without prompt
    logprobs, its logprobs of the engine's tokens) are far outside the tolerance."""
    prompt = case["prompts"][name][0]
    s = case["prompts"][name][2] if s is None else s
    for wrong in NEIGHBOURS[s]:
        wrong_prompt, _, wrong_steps = hf_reference(case, name, wrong, ours["token_ids"])
        if ours.get("prompt_logprobs"):
            gap = prompt_logprob_gap(ours, prompt, wrong_prompt)
        else:
            gap = max(abs(step[str(t)] - wrong_steps[i][t].item())
                      for i, (t, step) in enumerate(zip(ours["token_ids"], ours["logprobs"])))
        assert gap > 100 * LOGPROB_TOL, (name, wrong, gap)


def assert_steps_match(ours: dict, tokens: list[int], steps: torch.Tensor,
                       expected: int) -> None:
    """The engine made all `expected` tokens, and at every step its chosen token's logprob is
    within LOGPROB_TOL of HF's for that token. `steps` is HF teacher-forced over the engine's
    own tokens, so every step is comparable, past a near-tie too; where the engine's token is
    not HF's greedy one (`tokens`), the two must be within TIE in HF."""
    assert len(ours["token_ids"]) == expected == len(tokens)
    for step, mine in enumerate(ours["token_ids"]):
        if mine != tokens[step]:
            assert steps[step][tokens[step]] - steps[step][mine] < TIE, f"step {step}"
        assert ours["logprobs"][step][str(mine)] == pytest.approx(steps[step][mine].item(),
                                                                  abs=LOGPROB_TOL), f"step {step}"


@pytest.mark.parametrize("name", ["short", "mid", "own"])
def test_each_request_equals_hf_at_its_admitted_scale(case, one_step, name):
    """In one mixed batch: s = 1 (as trained), s = 2 (listed) and s = 3 (its own yarn_factor)."""
    outputs, _ = one_step
    prompt, _, s = case["prompts"][name]
    ref_prompt, ref_tokens, ref_steps = hf_reference(case, name, s,
                                                       outputs[name]["token_ids"])
    gap = prompt_logprob_gap(outputs[name], prompt, ref_prompt)
    assert gap < LOGPROB_TOL
    assert_steps_match(outputs[name], ref_tokens, ref_steps, NEW)
    assert_far_from_neighbours(case, name, outputs[name])


@pytest.mark.parametrize("name", ["long", "mid_other_scale"])
def test_long_requests_equal_vllms_static_yarn_at_their_scale(case, one_step, vllm_s4, name):
    outputs, _ = one_step
    ours, ref = outputs[name], vllm_s4[name]
    assert ours["token_ids"] == ref["token_ids"]
    for a, b in zip(ours["logprobs"], ref["logprobs"]):
        for token, lp in a.items():
            if token in b:
                assert lp == pytest.approx(b[token], abs=LOGPROB_TOL)
    if name == "long":  # it asked for prompt logprobs: every position agrees
        gaps = [abs(a[k] - b[k]) for a, b in zip(ours["prompt_logprobs"][1:],
                                                  ref["prompt_logprobs"][1:]) for k in a if k in b]
        assert len(gaps) >= 2999 and max(gaps) < LOGPROB_TOL
    assert_far_from_neighbours(case, name, ours)


def test_prefix_cache_hits_within_a_scale_and_never_across(one_step):
    outputs, result = one_step
    assert result["prefix_caching"] is True
    cached = {n: outputs[n]["num_cached_tokens"] for n in outputs}
    assert cached["mid_again"] >= 1280 - 128  # mid's blocks, computed at s = 2
    assert cached["short_again"] >= 256 - 128  # short's blocks, at s = 1 (unsalted)
    assert cached["mid_other_scale"] == 0  # the same prefix at s = 4: never mid's s = 2 blocks
    assert cached["mid_other_scale_again"] >= 1280  # but s = 4 blocks serve s = 4 requests


def test_cache_hits_change_nothing(case, one_step):
    outputs, _ = one_step
    for name in ("mid_again", "short_again"):
        _, tokens, steps = hf_reference(case, name, case["prompts"][name][2],
                                        outputs[name]["token_ids"])
        assert_steps_match(outputs[name], tokens, steps, NEW)
        assert_far_from_neighbours(case, name, outputs[name])
    assert outputs["mid_other_scale_again"]["token_ids"] == outputs["mid_other_scale"]["token_ids"]


@pytest.mark.parametrize("name", BATCH_1)
def test_chunked_prefill_equals_one_step_prefill(case, one_step, chunked, name):
    """A 256-token budget prefills the 3,000-token prompt in 12 chunks, each at its scale."""
    a, b = one_step[0][name], chunked[0][name]
    assert a["token_ids"] == b["token_ids"]
    gaps = [abs(x[k] - y[k]) for x, y in zip(a["prompt_logprobs"][1:], b["prompt_logprobs"][1:])
            for k in x if k in y]
    assert max(gaps) < LOGPROB_TOL
    assert_far_from_neighbours(case, name, b)  # the chunked run is at its own scale


@pytest.mark.parametrize("name", GROW)
def test_preempted_requests_keep_their_scale(case, chunked, name):
    """Three requests outgrow a 26-block cache while decoding; vLLM preempts and recomputes.
    Every one must still equal its reference at the scale it was admitted at."""
    outputs, result = chunked
    assert result["num_preemptions"] and result["num_preemptions"] > 0
    _, tokens, steps = hf_reference(case, name, case["prompts"][name][2],
                                    outputs[name]["token_ids"])
    assert_steps_match(outputs[name], tokens, steps, GROW_TOKENS)
    assert_far_from_neighbours(case, name, outputs[name])
    # which request vLLM preempted, and at which scale, is pinned in
    # test_request_escalation.py::test_a_preempted_request_resumes_at_its_current_scale


def test_served_by_our_layer_on_vllms_own_attention(one_step):
    _, result = one_step
    assert result["rotary_classes"] == ["yarn_vllm.vllm_seam.rotary.YarnRotaryEmbedding"]
    assert result["attention_backends"] == [
        "vllm.v1.attention.backends.cpu_attn.CPUAttentionBackend"]
