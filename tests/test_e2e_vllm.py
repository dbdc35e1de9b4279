"""End to end on the real vLLM engine (CPU): plugin on vs off, and vLLM vs HF transformers.

A random tiny Llama trained to 1024 positions is served with YaRN s=4 on a
3,000-token prompt, well past its trained length.
"""

from __future__ import annotations

import json
import os

import pytest
import torch

from yarn_vllm.config import YarnConfig
from yarn_vllm.engine_worker import run_engine

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
    return {"on": run_engine(yarn_case, plugins=True, timeout=600),
            "off": run_engine(yarn_case, plugins=False, timeout=600)}


def test_engine_uses_our_layer_only_with_plugin(engine_outputs):
    assert engine_outputs["on"]["rotary_classes"] == ["yarn_vllm.rotary.YarnRotaryEmbedding"]
    assert engine_outputs["off"]["rotary_classes"] == [
        "vllm.model_executor.layers.rotary_embedding.yarn_scaling_rope.YaRNScalingRotaryEmbedding"]


def test_plugin_on_and_off_agree(engine_outputs):
    on, off = engine_outputs["on"]["outputs"][0], engine_outputs["off"]["outputs"][0]
    assert len(on["token_ids"]) == NEW_TOKENS
    assert on["token_ids"] == off["token_ids"]
    # the logprob of each actual prompt token, positions 1..P-1
    diffs = []
    for a, b in zip(on["prompt_logprobs"][1:], off["prompt_logprobs"][1:]):
        common = set(a) & set(b)
        assert common
        diffs += [abs(a[t] - b[t]) for t in common]
    assert len(diffs) >= PROMPT_LEN - 1
    assert max(diffs) < 1e-2  # bf16-level tolerance on logprobs (the engine runs fp32)


def test_vllm_with_plugin_matches_hf_transformers(yarn_case, engine_outputs):
    from transformers import AutoConfig, LlamaForCausalLM

    config = AutoConfig.from_pretrained(yarn_case["model"])
    for key, value in yarn_case["llm_kwargs"]["hf_overrides"].items():
        setattr(config, key, value)
    model = LlamaForCausalLM.from_pretrained(yarn_case["model"], config=config,
                                             dtype=torch.float32).eval()
    prompt = torch.tensor([yarn_case["prompts"][0]])
    with torch.no_grad():
        hf_ids = model.generate(prompt, max_new_tokens=NEW_TOKENS, do_sample=False,
                                min_new_tokens=NEW_TOKENS, output_scores=True,
                                return_dict_in_generate=True, eos_token_id=None,
                                pad_token_id=0)
    hf_tokens = hf_ids.sequences[0, PROMPT_LEN:].tolist()
    ours = engine_outputs["on"]["outputs"][0]
    assert ours["token_ids"] == hf_tokens
    # logprobs of the chosen tokens, step by step
    for step, (scores, token) in enumerate(zip(hf_ids.scores, hf_tokens)):
        hf_lp = torch.log_softmax(scores[0].float(), -1)[token].item()
        assert ours["logprobs"][step][str(token)] == pytest.approx(hf_lp, abs=1e-2)
