"""HF transformers as the independent reference at a YaRN scale: one cached model per scale.

`hf_logprobs(model, ids, s, original)` runs HF's own Llama with plain RoPE at s = 1 and HF's
YaRN (rope_type "yarn", factor s, original_max_position_embeddings `original`) otherwise,
teacher-forced over `ids`: log-softmax [len(ids), vocab], row p - 1 scoring the token at p.
"""

from __future__ import annotations

import torch

_MODELS: dict[tuple, object] = {}


def hf_model(model: str, s: float, original: int):
    from transformers import AutoConfig, LlamaForCausalLM

    key = (model, float(s), int(original))
    if key not in _MODELS:
        config = AutoConfig.from_pretrained(model)
        if s != 1.0:
            config.max_position_embeddings = int(4 * original)
            config.rope_parameters = {"rope_type": "yarn", "factor": float(s),
                                      "rope_theta": 10000.0,
                                      "original_max_position_embeddings": int(original)}
        _MODELS[key] = LlamaForCausalLM.from_pretrained(model, config=config,
                                                        dtype=torch.float32).eval()
    return _MODELS[key]


def hf_logprobs(model: str, ids: list[int], s: float, original: int) -> torch.Tensor:
    with torch.no_grad():
        logits = hf_model(model, s, original)(torch.tensor([ids])).logits[0]
    return torch.log_softmax(logits.float(), -1)
