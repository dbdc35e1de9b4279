"""Dynamic YaRN with vLLM's serving features on, on the real engine (CPU), exact.

A random tiny Llama trained to L = 1024, dynamic mode with factor 4. Engines:

  one_step  chunked prefill off (every prompt prefilled in one step), prefix caching on;
            batches in order: a long prompt and a short one; then prompts sharing the
            short one's first 512 tokens, one short (s = 1) and one long (s > 1); then
            five questions over one 2,100-token document, one batch each;
  chunked   a 256-token budget (the 2,500-token prompt in 10 chunks), prefix caching off;
  stepped   as one_step's document questions, with `yarn_dynamic_scale_step: 0.25`.
"""

from __future__ import annotations

import json
import os

import pytest
import torch

from conftest import run_engines
from yarn_vllm.yarn.config import YarnConfig

L, NEW = 1024, 8
LOGPROB_TOL = 1e-4  # fp32 engine against itself (chunked or cached) and short prompts
# The engine against HF over every position of a 2,000-2,500-token prompt: both fp32 but
# not the same arithmetic (our CPU prefill kernel reads exact angles and sums in tiles, HF
# forms pos x inv_freq in fp32, 8e-5 rad off at 2,500), so each carries its own rounding:
# on the 2,500-token prompt HF is 9.1e-4 from an fp64 forward, the engine 3.8e-4, the two
# 5.3e-4 apart (measured).
HF_TOL = 1e-3
# Dynamic mode's neighbouring scales: a length one 32-token block away, s +- 1/32
# (tests/dynamic_reference.py); a contrast must land 100 tolerances away.
NEIGHBOUR, CONTRAST, HF_CONTRAST = 1 / 32, 100 * LOGPROB_TOL, 100 * HF_TOL
QUESTIONS = 5


def _tokens(vocab, n, seed):
    return torch.randint(2, vocab, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


@pytest.fixture(scope="session")
def case(tiny_llama):
    hf = json.load(open(os.path.join(tiny_llama, "config.json")))
    v = hf["vocab_size"]
    short = _tokens(v, 600, 21)
    document = _tokens(v, 2100, 22)
    prompts = {"long": _tokens(v, 2500, 20), "short": short,
               "short_shared": short[:512] + _tokens(v, 80, 23),
               "long_shared": short[:512] + _tokens(v, 1500, 24)}
    for q in range(QUESTIONS):  # 2,130 to 2,170 tokens: exact scales all differ
        prompts[f"question{q}"] = document + _tokens(v, 30 + 10 * q, 30 + q)
    return {"model": tiny_llama, "hf": hf, "prompts": prompts}


def _spec(case, batches, step=None, **llm_kwargs):
    yarn = YarnConfig(factor=4.0, mode="dynamic", dynamic_scale_step=step)
    overrides = yarn.hf_overrides(case["hf"])
    first, *rest = [[{"prompt_token_ids": case["prompts"][n], "sampling": s}
                     for n, s in batch] for batch in batches]
    return {"model": case["model"], "prompts": first, "batches": rest,
            "sampling": {"max_tokens": NEW, "logprobs": 1, "detokenize": False},
            "llm_kwargs": {"dtype": "float32", "hf_overrides": overrides, "seed": 0,
                           "max_model_len": 3200, "skip_tokenizer_init": True, **llm_kwargs}}


LOGPROBS = {"prompt_logprobs": 1}
QUESTION_BATCHES = [[(f"question{q}", {})] for q in range(QUESTIONS)]
ONE_STEP = [[("long", LOGPROBS), ("short", {})],
            [("short_shared", {}), ("long_shared", LOGPROBS)]] + QUESTION_BATCHES
CHUNKED = [[("long", LOGPROBS)], [("long_shared", LOGPROBS)]]


def _names(batches):
    return [n for batch in batches for n, _ in batch]


@pytest.fixture(scope="session")
def engines(case):
    """The three engines above, started side by side."""
    return run_engines({
        "one_step": dict(spec=_spec(case, ONE_STEP, enable_chunked_prefill=False,
                                    max_num_batched_tokens=3200, enable_prefix_caching=True)),
        "chunked": dict(spec=_spec(case, CHUNKED, enable_chunked_prefill=True,
                                   max_num_batched_tokens=256, enable_prefix_caching=False)),
        "stepped": dict(spec=_spec(case, QUESTION_BATCHES, step=0.25,
                                   enable_prefix_caching=True))},
        timeout=900, in_process=True)


@pytest.fixture(scope="session")
def one_step(engines):
    return dict(zip(_names(ONE_STEP), engines["one_step"]["outputs"])), engines["one_step"]


@pytest.fixture(scope="session")
def chunked(engines):
    return dict(zip(_names(CHUNKED), engines["chunked"]["outputs"])), engines["chunked"]


@pytest.fixture(scope="session")
def stepped(engines):
    return dict(zip(_names(QUESTION_BATCHES), engines["stepped"]["outputs"]))


def _gaps(a, b, key):
    return [abs(x[k] - y[k]) for x, y in zip(a[key], b[key]) if x and y for k in x if k in y]


@pytest.mark.parametrize("name", ["long", "long_shared"])
def test_chunked_prefill_equals_one_step_prefill(case, one_step, chunked, name):
    """Every chunk runs at s(P): the logprobs of every prompt token and of the generated
    ones, and the greedy tokens, equal a one-step prefill's; the prompt's equal HF's static
    YaRN at s(P), and the neighbouring scales s(P) +- 1/32 are far from them."""
    a, b = one_step[0][name], chunked[0][name]
    assert chunked[1]["chunked_prefill"] is True and one_step[1]["chunked_prefill"] is False
    assert a["token_ids"] == b["token_ids"]
    prompt_gaps = _gaps(a, b, "prompt_logprobs")
    assert len(prompt_gaps) >= len(a["prompt_logprobs"]) - 1
    assert max(prompt_gaps) < LOGPROB_TOL and max(_gaps(a, b, "logprobs")) < LOGPROB_TOL
    s = len(case["prompts"][name]) / L
    got = _prompt_logprobs(case, b, name)
    assert (got - _hf(case, name, s)[0]).abs().max().item() < HF_TOL
    for neighbour in (s - NEIGHBOUR, s + NEIGHBOUR):
        assert (got - _hf(case, name, neighbour)[0]).abs().max().item() > HF_CONTRAST, neighbour


def _prompt_logprobs(case, ours: dict, name: str) -> torch.Tensor:
    """The engine's logprob of each prompt token after the first [P - 1]."""
    return torch.tensor([step[str(t)] for step, t in zip(ours["prompt_logprobs"][1:],
                                                         case["prompts"][name][1:])])


def _hf(case, name, s):
    """HF transformers at static scale s (plain RoPE at s = 1), one forward over the prompt:
    the per-token prompt logprobs [P - 1] and the next token's log-softmax [vocab]."""
    from transformers import AutoConfig, LlamaForCausalLM

    config = AutoConfig.from_pretrained(case["model"])
    if s != 1.0:
        config.max_position_embeddings = 4 * L
        config.rope_parameters = {"rope_type": "yarn", "factor": s, "rope_theta": 10000.0,
                                  "original_max_position_embeddings": L}
    model = LlamaForCausalLM.from_pretrained(case["model"], config=config,
                                             dtype=torch.float32).eval()
    ids = torch.tensor([case["prompts"][name]])
    with torch.no_grad():
        lp = torch.log_softmax(model(ids).logits[0].float(), -1)
    return lp[:-1].gather(1, ids[0, 1:, None])[:, 0], lp[-1]


def test_short_prompts_share_a_prefix_and_run_as_trained(case, one_step):
    outputs, result = one_step
    assert result["prefix_caching"] is True
    shared = outputs["short_shared"]
    assert shared["num_cached_tokens"] >= 512 - 128  # the short prompt's blocks (128 each)
    _, next_token = _hf(case, "short_shared", 1.0)
    first = shared["token_ids"][0]
    assert int(next_token.argmax()) == first  # greedy as trained
    assert shared["logprobs"][0][str(first)] == pytest.approx(next_token[first].item(),
                                                              abs=LOGPROB_TOL)
    _, above = _hf(case, "short_shared", 1 + NEIGHBOUR)  # the neighbouring scale: far off
    assert abs(shared["logprobs"][0][str(first)] - above[first].item()) > CONTRAST


def test_a_long_prompt_never_reuses_a_short_ones_blocks(case, one_step, chunked):
    """long_shared starts with short's 512 tokens but prefills at s(2012) = 1.96: no hit,
    and every prompt logprob equals a fresh engine's (chunked ran it with no cache) and
    HF's static YaRN at that scale."""
    outputs, _ = one_step
    ours = outputs["long_shared"]
    assert ours["num_cached_tokens"] == 0
    assert max(_gaps(ours, chunked[0]["long_shared"], "prompt_logprobs")) < LOGPROB_TOL
    s = len(case["prompts"]["long_shared"]) / L
    ref, _ = _hf(case, "long_shared", s)
    got = _prompt_logprobs(case, ours, "long_shared")
    assert (got - ref).abs().max().item() < HF_TOL
    for neighbour in (s - NEIGHBOUR, s + NEIGHBOUR):  # the contrasts
        assert (got - _hf(case, "long_shared", neighbour)[0]).abs().max().item() > HF_CONTRAST


def test_scale_step_lets_questions_over_one_document_share_it(case, one_step, stepped):
    """Exact scales differ for every question (s = P / L, 2.08 to 2.12), so no blocks are
    shared; with a step of 0.25 they all prefill at 2.25 and share the document's blocks:
    each question after the first finds the document's 16 full blocks of 128 in the cache,
    4 x 2,048 of 10,750 prompt tokens, the 76% docs/modes.md quotes."""
    outputs, _ = one_step
    names = [f"question{q}" for q in range(QUESTIONS)]
    total = sum(len(case["prompts"][n]) for n in names)
    exact = sum(outputs[n]["num_cached_tokens"] for n in names)
    step = sum(stepped[n]["num_cached_tokens"] for n in names)
    print(f"\ndocument questions: cache hit rate exact {exact / total:.1%}, "
          f"step 0.25 {step / total:.1%} ({total} prompt tokens)")
    assert exact == 0
    assert stepped[names[0]]["num_cached_tokens"] == 0
    assert [stepped[n]["num_cached_tokens"] for n in names[1:]] == [2048] * 4  # 16 blocks of 128
    assert total == 10750 and round(100 * step / total) == 76
