"""`mscale` and `mscale_all_dim` through a real engine (CPU, fp32), in request and dynamic mode.

DeepSeek's magnitude: with both set, q and k are scaled by
(0.1 mscale ln s + 1) / (0.1 mscale_all_dim ln s + 1) in place of Eq. 22's 0.1 ln s + 1.
The tiny Llama (L = 1024) gets mscale 0.8, mscale_all_dim 0.3 and truncate off (the
correction range's bounds left fractional), in two engines started side by side:

  request  factor 4 (scales 1, 2, 4 on offer); a 1,500-token prompt at its own
           yarn_factor 2 (listed) and one at 3 (not listed), explicit max_tokens;
  dynamic  factor 4; a 2,000-token prompt and 8 new tokens: prefill at s(P) = 1.95,
           each decode step at s(l).

References: HF transformers' static YaRN at s, which reads mscale, mscale_all_dim and
truncate (request mode, and dynamic mode's prefill, which is static YaRN at s(P)); the
paper's Dynamic YaRN written out in fp64 (tests/dynamic_reference.py) for dynamic mode's
decode steps, where HF has no equivalent. Contrasts: the two settings swapped, Eq. 22's
magnitude (neither set), truncate on, and the neighbouring scales.
"""

from __future__ import annotations

import dataclasses
import json
import os

import pytest
import torch

from conftest import run_engines
from dynamic_reference import (CONTRAST, LOGPROB_TOL, NEIGHBOUR, assert_follows, generate,
                               logprob_gap, rope_of)
from yarn_vllm.yarn.config import YarnConfig

L, NEW = 1024, 8
MAGNITUDE = {"mscale": 0.8, "mscale_all_dim": 0.3, "truncate": False}
SWAPPED = {"mscale": 0.3, "mscale_all_dim": 0.8, "truncate": False}
# request mode: name -> (prompt tokens, its own yarn_factor, the listed neighbours)
REQUESTS = {"at2": (1500, 2.0, (1.0, 4.0)), "at3": (1500, 3.0, (2.0, 4.0))}
DYNAMIC_PROMPT = 2000
# Dynamic mode's prefill against HF over 2,000 positions: both fp32 but not the same
# arithmetic (our prefill kernel reads exact angles, HF forms them in fp32), so the
# tolerance of tests/test_dynamic_serving_e2e.py (HF_TOL), with its contrast 100 times it.
HF_TOL = 1e-3


@pytest.fixture(scope="session")
def case(tiny_llama):
    hf = json.load(open(os.path.join(tiny_llama, "config.json")))
    g = torch.Generator().manual_seed(31)
    prompts = {name: torch.randint(2, hf["vocab_size"], (n,), generator=g).tolist()
               for name, n in [("at2", 1500), ("at3", 1500), ("dynamic", DYNAMIC_PROMPT)]}
    return {"model": tiny_llama, "hf": hf, "prompts": prompts}


def _spec(case, mode: str, prompts: list) -> dict:
    overrides = YarnConfig(factor=4.0, mode=mode, **MAGNITUDE).hf_overrides(case["hf"])
    return {"model": case["model"], "prompts": prompts,
            "sampling": {"max_tokens": NEW, "logprobs": 1, "prompt_logprobs": 1,
                         "detokenize": False},
            "llm_kwargs": {"dtype": "float32", "hf_overrides": overrides,
                           "max_model_len": overrides["max_position_embeddings"],
                           "skip_tokenizer_init": True}}


@pytest.fixture(scope="session")
def engines(case):
    request = [{"prompt_token_ids": case["prompts"][name],
                "sampling": {"extra_args": {"yarn_factor": s}}}
               for name, (_, s, _) in REQUESTS.items()]
    runs = run_engines({"request": dict(spec=_spec(case, "request", request)),
                        "dynamic": dict(spec=_spec(case, "dynamic",
                                                   [case["prompts"]["dynamic"]]))},
                       timeout=900, in_process=True)
    return {"request": dict(zip(REQUESTS, runs["request"]["outputs"])),
            "dynamic": runs["dynamic"]["outputs"][0], "results": runs}


_HF: dict = {}


def _hf(case, s: float, magnitude: dict, ids: list[int]) -> torch.Tensor:
    """HF transformers' static YaRN at s with `magnitude` in its rope_parameters, one forward
    over `ids`: the log-softmax after each position [len(ids), vocab]."""
    from transformers import AutoConfig, LlamaForCausalLM

    key = (s, tuple(sorted(magnitude.items())))
    if key not in _HF:
        config = AutoConfig.from_pretrained(case["model"])
        if s != 1.0:
            config.max_position_embeddings = 4 * L
            config.rope_parameters = {"rope_type": "yarn", "factor": s, "rope_theta": 10000.0,
                                      "original_max_position_embeddings": L, **magnitude}
        _HF[key] = LlamaForCausalLM.from_pretrained(case["model"], config=config,
                                                    dtype=torch.float32).eval()
    with torch.no_grad():
        return torch.log_softmax(_HF[key](torch.tensor([ids])).logits[0].float(), -1)


def _gap(case, name: str, ours: dict, s: float, magnitude: dict) -> float:
    """Largest |engine - HF at s| over the prompt's tokens and the engine's own tokens."""
    prompt = case["prompts"][name]
    ids = prompt + ours["token_ids"]
    lp = _hf(case, s, magnitude, ids)
    mine = [step[str(t)] for step, t in zip(ours["prompt_logprobs"][1:], prompt[1:])]
    mine += [step[str(t)] for step, t in zip(ours["logprobs"], ours["token_ids"])]
    theirs = lp[:-1].gather(1, torch.tensor(ids[1:])[:, None])[:, 0]
    return (torch.tensor(mine) - theirs).abs().max().item()


@pytest.mark.parametrize("name", list(REQUESTS))
def test_request_mode_carries_mscale_and_mscale_all_dim(case, engines, name):
    """Each request at its own yarn_factor equals HF's static YaRN at that scale with the same
    mscale, mscale_all_dim and truncate, on every prompt token and every generated one."""
    ours = engines["request"][name]
    _, s, neighbours = REQUESTS[name]
    assert engines["results"]["request"]["rotary_classes"] == [
        "yarn_vllm.vllm_seam.rotary.YarnRotaryEmbedding"]
    assert len(ours["token_ids"]) == NEW
    lp = _hf(case, s, MAGNITUDE, case["prompts"][name] + ours["token_ids"])
    p = len(case["prompts"][name])
    for step, token in enumerate(ours["token_ids"]):  # greedy, or a tie
        assert lp[p - 1 + step].max() - lp[p - 1 + step][token] < 1e-3
    assert _gap(case, name, ours, s, MAGNITUDE) < LOGPROB_TOL
    contrasts = {"swapped": (s, SWAPPED), "Eq. 22": (s, {"truncate": False}),
                 "truncate on": (s, {**MAGNITUDE, "truncate": True}),
                 **{f"s = {n:g}": (n, MAGNITUDE) for n in neighbours}}
    for what, (other_s, magnitude) in contrasts.items():
        assert _gap(case, name, ours, other_s, magnitude) > CONTRAST, what


def test_dynamic_mode_carries_mscale_and_mscale_all_dim(case, engines, hf_model):
    """The prefill (prompt logprobs and the first token) equals HF's static YaRN at
    s(P) = 2000 / 1024 with the same settings; every step, decode included, equals the
    paper's Dynamic YaRN written out in fp64 with DeepSeek's magnitude ratio."""
    ours = engines["dynamic"]
    assert engines["results"]["dynamic"]["attention_backends"] == [
        "yarn_vllm.attention.backend.YarnDynamicAttentionBackend"]
    prompt = case["prompts"]["dynamic"]
    s = DYNAMIC_PROMPT / L
    first = {"token_ids": ours["token_ids"][:1], "logprobs": ours["logprobs"][:1],
             "prompt_logprobs": ours["prompt_logprobs"]}
    assert _gap(case, "dynamic", first, s, MAGNITUDE) < HF_TOL
    rope = dataclasses.replace(rope_of(case["hf"], L), **MAGNITUDE)
    _, logprobs = generate(hf_model, prompt, NEW, rope, forced=ours["token_ids"])
    assert_follows(ours, logprobs)
    for what, other in {"swapped": dataclasses.replace(rope, **SWAPPED),
                        "Eq. 22": dataclasses.replace(rope, mscale=None, mscale_all_dim=None),
                        "truncate on": dataclasses.replace(rope, truncate=True),
                        "s + 1/32": dataclasses.replace(rope, scale_offset=NEIGHBOUR),
                        "s - 1/32": dataclasses.replace(rope, scale_offset=-NEIGHBOUR)}.items():
        _, wrong = generate(hf_model, prompt, NEW, other, forced=ours["token_ids"])
        assert logprob_gap(ours, wrong) > CONTRAST, what
    for what, magnitude in {"swapped": SWAPPED, "Eq. 22": {"truncate": False}}.items():
        assert _gap(case, "dynamic", first, s, magnitude) > 100 * HF_TOL, what


@pytest.fixture(scope="session")
def hf_model(tiny_llama):
    from transformers import LlamaForCausalLM

    return LlamaForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()
