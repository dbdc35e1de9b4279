"""End to end on the real vLLM engine (CPU): plugin on vs off, and vLLM vs HF transformers.

A random tiny Llama trained to 1024 positions is served with YaRN s=4 on a
3,000-token prompt, well past its trained length. Engines and references run fp32, so
logprobs are compared at LOGPROB_TOL (2e-4); each test also checks that a wrong YaRN
scale (s = 2), or the model as trained, lands at least CONTRAST (2e-2) away.
"""

from __future__ import annotations

import json
import os

import pytest
import torch

from conftest import run_engines
from dynamic_reference import CONTRAST, LOGPROB_TOL, TIE
from yarn_vllm.yarn.config import YarnConfig

PROMPT_LEN, NEW_TOKENS = 3000, 64


@pytest.fixture(scope="session")
def yarn_case(tiny_llama):
    hf = json.load(open(os.path.join(tiny_llama, "config.json")))
    overrides = YarnConfig(factor=4.0).hf_overrides(hf)
    prompt = torch.randint(2, hf["vocab_size"], (PROMPT_LEN,),
                           generator=torch.Generator().manual_seed(7)).tolist()
    return {"model": tiny_llama, "prompts": [prompt],
            "llm_kwargs": {"dtype": "float32", "hf_overrides": overrides,
                           "max_model_len": overrides["max_position_embeddings"],
                           "skip_tokenizer_init": True, "enforce_eager": True},
            "sampling": {"max_tokens": NEW_TOKENS, "logprobs": 5, "prompt_logprobs": 1,
                         "detokenize": False}}


@pytest.fixture(scope="session")
def engine_outputs(yarn_case):
    # vLLM's own engine-core process, which loads the plugin again (as every process does)
    return run_engines({"on": dict(plugins=True), "off": dict(plugins=False)}, spec=yarn_case,
                       timeout=600)


@pytest.fixture(scope="session")
def hf_logprobs(yarn_case, engine_outputs):
    """HF transformers' log-softmax [P + N - 1, vocab] over the prompt and the plugin engine's
    tokens (one teacher-forced forward each): YaRN s = 4, a wrong s = 2, and as trained."""
    from transformers import AutoConfig, LlamaForCausalLM

    overrides = yarn_case["llm_kwargs"]["hf_overrides"]
    wrong = {**overrides, "rope_parameters": {**overrides["rope_parameters"], "factor": 2.0}}
    ids = torch.tensor([yarn_case["prompts"][0] + engine_outputs["on"]["outputs"][0]["token_ids"]])
    out = {}
    for name, changes in (("yarn", overrides), ("wrong_scale", wrong), ("trained", {})):
        config = AutoConfig.from_pretrained(yarn_case["model"])
        for key, value in changes.items():
            setattr(config, key, value)
        model = LlamaForCausalLM.from_pretrained(yarn_case["model"], config=config,
                                                 dtype=torch.float32).eval()
        with torch.no_grad():
            out[name] = torch.log_softmax(model(ids[:, :-1]).logits[0].float(), -1)
    return out


def _prompt_gap(engine: dict, prompt: list[int], reference) -> float:
    """Largest |engine - reference| on the logprob of each actual prompt token, positions
    1..P-1 (the engine's `prompt_logprobs`; reference: a [>= P - 1, vocab] table, or another
    engine's output)."""
    gaps = []
    for i, step in enumerate(engine["prompt_logprobs"][1:], start=1):
        other = (reference["prompt_logprobs"][i][str(prompt[i])] if isinstance(reference, dict)
                 else reference[i - 1, prompt[i]].item())
        gaps.append(abs(step[str(prompt[i])] - other))
    assert len(gaps) == len(prompt) - 1
    return max(gaps)


def _step_gap(engine: dict, table: torch.Tensor) -> float:
    """Largest |engine - reference| on the logprob of each generated token."""
    offset = PROMPT_LEN - 1
    return max(abs(step[str(token)] - table[offset + k, token].item())
               for k, (token, step) in enumerate(zip(engine["token_ids"], engine["logprobs"])))


def test_engine_uses_our_layer_only_with_plugin(engine_outputs):
    assert engine_outputs["on"]["rotary_classes"] == ["yarn_vllm.vllm_seam.rotary.YarnRotaryEmbedding"]
    assert engine_outputs["off"]["rotary_classes"] == [
        "vllm.model_executor.layers.rotary_embedding.yarn_scaling_rope.YaRNScalingRotaryEmbedding"]
    assert engine_outputs["on"]["dtype"] == engine_outputs["off"]["dtype"] == "float32"


def test_plugin_on_and_off_agree(yarn_case, engine_outputs, hf_logprobs):
    on, off = engine_outputs["on"]["outputs"][0], engine_outputs["off"]["outputs"][0]
    prompt = yarn_case["prompts"][0]
    assert len(on["token_ids"]) == NEW_TOKENS
    assert on["token_ids"] == off["token_ids"]
    assert _prompt_gap(on, prompt, off) <= LOGPROB_TOL
    for token, step_on, step_off in zip(on["token_ids"], on["logprobs"], off["logprobs"]):
        common = step_on.keys() & step_off.keys()  # the top 5 may differ at a near-tie
        assert str(token) in common
        assert max(abs(step_on[t] - step_off[t]) for t in common) <= LOGPROB_TOL
    # contrast: vLLM's own layer against a wrong scale, or the model as trained
    for wrong in ("wrong_scale", "trained"):
        assert _prompt_gap(off, prompt, hf_logprobs[wrong]) > CONTRAST, wrong


def test_vllm_with_plugin_matches_hf_transformers(yarn_case, engine_outputs, hf_logprobs):
    ours, prompt = engine_outputs["on"]["outputs"][0], yarn_case["prompts"][0]
    reference = hf_logprobs["yarn"]
    for k, token in enumerate(ours["token_ids"]):  # greedy under HF too (or an exact tie)
        row = reference[PROMPT_LEN - 1 + k]
        assert row.max().item() - row[token].item() < TIE, f"step {k}"
    assert _prompt_gap(ours, prompt, reference) <= LOGPROB_TOL
    assert _step_gap(ours, reference) <= LOGPROB_TOL
    for wrong in ("wrong_scale", "trained"):
        assert _prompt_gap(ours, prompt, hf_logprobs[wrong]) > CONTRAST, wrong
        assert _step_gap(ours, hf_logprobs[wrong]) > CONTRAST, wrong
