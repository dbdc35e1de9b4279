"""Dynamic YaRN end to end on the real vLLM engine (CPU), against independent references.

One engine serves three prompts of a random tiny Llama trained to L = 1024 in one
batch, in dynamic mode (each sequence at its own scale in every step):
  * 300 tokens + 48 new: never past L, so it must be the model as trained (HF);
  * 1000 tokens + 48 new: crosses L while decoding, so the scale changes every
    step (plain-PyTorch loop with a pre-RoPE cache, tests/dynamic_reference.py);
  * 2500 tokens: its first token must be static YaRN at s = 2500 / L (HF).
The engine runs fp32, and so do the references: logprobs agree within LOGPROB_TOL (2e-4),
and each test checks that a wrong scale would land at least CONTRAST (2e-2) away.
Staggered arrivals, short prompts and preemption: tests/test_dynamic_engine_steps.py.
"""

from __future__ import annotations

import dataclasses
import json
import os

import pytest
import torch

from dynamic_reference import (CONTRAST, LOGPROB_TOL, NEIGHBOUR, assert_follows, generate,
                               logprob_gap, rope_of)
from yarn_vllm.yarn.config import YarnConfig
from yarn_vllm.tools.engine_worker import run_engine

L, NEW = 1024, 48
PROMPTS = {"short": 300, "crossing": 1000, "long": 2500}


def _case(tiny_llama, **llm_kwargs):
    hf = json.load(open(os.path.join(tiny_llama, "config.json")))
    overrides = YarnConfig(factor=4.0, mode="dynamic").hf_overrides(hf)
    g = torch.Generator().manual_seed(11)
    prompts = [torch.randint(2, hf["vocab_size"], (n,), generator=g).tolist()
               for n in PROMPTS.values()]
    return {"model": tiny_llama, "prompts": prompts, "hf": hf,
            "llm_kwargs": {"dtype": "float32", "hf_overrides": overrides,
                           "max_model_len": overrides["max_position_embeddings"],
                           "skip_tokenizer_init": True, **llm_kwargs},
            "sampling": {"max_tokens": NEW, "logprobs": 5, "detokenize": False}}


@pytest.fixture(scope="session")
def dynamic_run(tiny_llama):
    case = _case(tiny_llama)
    return case, run_engine({k: v for k, v in case.items() if k != "hf"}, timeout=900,
                            in_process=True)


@pytest.fixture(scope="session")
def hf_model(tiny_llama):
    from transformers import LlamaForCausalLM

    return LlamaForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()


def _outputs(dynamic_run, name):
    case, result = dynamic_run
    i = list(PROMPTS).index(name)
    return case["prompts"][i], result["outputs"][i]


def _rope(case, **changes):
    return dataclasses.replace(rope_of(case["hf"], L), **changes)


def test_engine_serves_dynamic_mode_with_our_backend(dynamic_run):
    _, result = dynamic_run
    assert result["attention_backends"] == [
        "yarn_vllm.attention.backend.YarnDynamicAttentionBackend"]
    assert result["rotary_classes"] == ["yarn_vllm.vllm_seam.rotary.YarnRotaryEmbedding"]
    assert result["dtype"] == "float32"


def test_within_trained_length_is_the_model_as_trained(dynamic_run, hf_model):
    """One HF forward over the prompt and the engine's tokens: the model as trained."""
    prompt, ours = _outputs(dynamic_run, "short")
    with torch.no_grad():
        logits = hf_model(torch.tensor([prompt + ours["token_ids"]])).logits[0].float()
    assert_follows(ours, list(torch.log_softmax(logits[len(prompt) - 1:-1], -1)))
    # contrast: the neighbouring scale, 1 + 1/32
    _, above = generate(hf_model, prompt, 1, _rope(dynamic_run[0], fixed_scale=1 + NEIGHBOUR))
    assert logprob_gap(ours, above) > CONTRAST


def test_decoding_across_the_boundary_rescales_every_step(dynamic_run, hf_model):
    prompt, ours = _outputs(dynamic_run, "crossing")
    assert len(prompt) < L < len(prompt) + NEW
    case, _ = dynamic_run
    _, logprobs = generate(hf_model, prompt, NEW, _rope(case), forced=ours["token_ids"])
    assert_follows(ours, logprobs)
    # contrasts, a few steps past L: the neighbouring scale s(l) + 1/32, and decoding at the
    # prompt's scale (s(P) = 1: the model as trained)
    for wrong in ({"scale_offset": NEIGHBOUR}, {"fixed_scale": 1.0}):
        _, other = generate(hf_model, prompt, L - len(prompt) + 4, _rope(case, **wrong),
                            forced=ours["token_ids"])
        assert logprob_gap(ours, other) > CONTRAST, wrong


def test_first_token_after_a_long_prompt_is_static_yarn_at_its_length(dynamic_run, tiny_llama,
                                                                      hf_model):
    from transformers import AutoConfig, LlamaForCausalLM

    prompt, ours = _outputs(dynamic_run, "long")
    factor = len(prompt) / L
    config = AutoConfig.from_pretrained(tiny_llama)
    config.rope_parameters = {"rope_type": "yarn", "factor": factor, "rope_theta": 10000.0,
                              "original_max_position_embeddings": L}
    config.max_position_embeddings = 4 * L
    model = LlamaForCausalLM.from_pretrained(tiny_llama, config=config, dtype=torch.float32)
    with torch.no_grad():
        logits = model.eval()(torch.tensor([prompt])).logits[0, -1]
    expected = torch.log_softmax(logits.float(), -1)
    first = ours["logprobs"][0]
    assert ours["token_ids"][0] == int(expected.argmax())
    for token, lp in first.items():
        assert lp == pytest.approx(expected[int(token)].item(), abs=LOGPROB_TOL)
    # contrast: the neighbouring scales, 2500 / 1024 +- 1/32
    for neighbour in (factor - NEIGHBOUR, factor + NEIGHBOUR):
        _, other = generate(hf_model, prompt, 1, _rope(dynamic_run[0], fixed_scale=neighbour))
        assert logprob_gap(ours, other) > CONTRAST, neighbour


@pytest.mark.parametrize("settings", [
    {}, {"mscale": 1.0, "mscale_all_dim": 0.5}, {"mscale": 0.707, "mscale_all_dim": 0.707},
    {"mscale": 2.0}, {"attention_factor": 1.25}, {"attention_factor": 0.9, "mscale": 1.0,
                                                  "mscale_all_dim": 0.5},
    {"truncate": False}, {"truncate": False, "beta_fast": 16.0, "beta_slow": 2.0}])
def test_the_engines_scale_rule_is_the_papers(settings):
    """What the backend reads (ScalePolicy, dynamic mode) against the paper written out in the
    reference (tests/dynamic_reference.py, float64, no yarn_vllm code): s = max(1, l / L),
    plain RoPE and attention scale 1 at s = 1, NTK-by-parts frequencies with or without
    `truncate`, Eq. 22 (or DeepSeek's ratio, or an explicit attention_factor) above it.
    `mscale` alone is ignored, as in HF and vLLM."""
    from yarn_vllm.yarn.scale_policy import ScalePolicy

    policy = ScalePolicy(YarnConfig(factor=4.0, original_max_position=L, mode="dynamic",
                                    **settings), 64, 10000.0)
    paper = dataclasses.replace(rope_of({"head_dim": 64, "rope_theta": 10000.0}, L),
                                **settings)
    # the other truncate: what a setting lost on the way would give
    other = dataclasses.replace(paper, truncate=not paper.truncate)
    for length in (1, 700, L, L + 1, 1500, 2500, 4 * L, 6000):
        s = paper.scale(length)
        assert policy.dynamic_factor(length) == s
        ours, exact = policy.inv_freq(s).double(), paper.inv_freq(s)
        assert torch.allclose(ours, exact, rtol=3e-7, atol=0), (s, (ours / exact - 1).abs().max())
        if s > 1.4:  # contrast: the other truncate is 10^4 times the tolerance away
            assert ((other.inv_freq(s) / exact - 1).abs().max() > 3e-3), s
        assert policy.attention_scale(s) == pytest.approx(paper.attention_scale(s), rel=1e-12)
    assert policy.attention_scale(1.0) == 1.0  # s = 1 runs as trained, whatever is configured


@pytest.mark.slow
def test_tensor_parallel_two_gives_the_same_tokens(tiny_llama, dynamic_run):
    """TP 2 on the mp executor (one core per rank) against the TP 1 run above."""
    case = _case(tiny_llama, tensor_parallel_size=2, distributed_executor_backend="mp")
    result = run_engine({k: v for k, v in case.items() if k != "hf"}, timeout=1200,
                        env={"VLLM_CPU_OMP_THREADS_BIND": "0|1"})
    for tp2, tp1 in zip(result["outputs"], dynamic_run[1]["outputs"]):
        assert tp2["token_ids"] == tp1["token_ids"]
        reference = [torch.full((case["hf"]["vocab_size"],), -1e9).index_put_(
            (torch.tensor([int(t) for t in step]),), torch.tensor(list(step.values())))
            for step in tp1["logprobs"]]
        assert_follows(tp2, reference)
