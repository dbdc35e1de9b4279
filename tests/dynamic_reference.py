"""Plain-PyTorch Dynamic-YaRN generation for a Llama: the paper's semantics, written directly.

It keeps a cache of keys *before* RoPE. Each step it takes the scale
s = max(1, l / L) from the length l after the step's tokens, re-rotates every
cached key and the step's queries with the YaRN frequencies at s, and scales the
logits by mscale(s)^2. The prompt is one step. Weights come from an HF
LlamaForCausalLM; only its linear layers, norms and MLPs are used.
"""

from __future__ import annotations

import torch

from yarn_vllm.attention.rope_spec import DynamicRope
from yarn_vllm.ops import rotary_reference


def _attention(q, k, v, positions_q, rope: DynamicRope, s: float, head_size: int):
    """q: [t, Hq, D]; k, v: [l, Hkv, D] pre-RoPE; returns [t, Hq * D] (fp32, float64 angles)."""
    inv_freq = rope.inv_freq(s)
    positions_k = torch.arange(k.shape[0])
    q = rotary_reference(q, positions_q, inv_freq, 1.0, rope.is_neox, torch.float64)
    k = rotary_reference(k, positions_k, inv_freq, 1.0, rope.is_neox, torch.float64)
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    logits = torch.einsum("qhd,khd->hqk", q, k) * (head_size ** -0.5 * rope.logit_multiplier(s))
    logits.masked_fill_(positions_k[None, None, :] > positions_q[None, :, None], float("-inf"))
    return torch.einsum("hqk,khd->qhd", logits.softmax(-1), v).reshape(q.shape[0], -1)


@torch.no_grad()
def generate(model, prompt: list[int], new_tokens: int, rope: DynamicRope
             ) -> tuple[list[int], list[torch.Tensor]]:
    """Greedy tokens and the log-softmax of every step ([vocab] each; the first is the prompt's)."""
    cfg = model.config
    head = cfg.head_dim
    layers = model.model.layers
    keys = [torch.empty(0, cfg.num_key_value_heads, head) for _ in layers]
    values = [torch.empty(0, cfg.num_key_value_heads, head) for _ in layers]
    tokens, logprobs = list(prompt), []
    step_ids = torch.tensor(prompt)
    for _ in range(new_tokens):
        length = len(tokens)
        positions = torch.arange(length - step_ids.shape[0], length)
        s = rope.scale(length)
        x = model.model.embed_tokens(step_ids).float()
        for i, layer in enumerate(layers):
            attn = layer.self_attn
            h = layer.input_layernorm(x)
            q = attn.q_proj(h).view(-1, cfg.num_attention_heads, head)
            keys[i] = torch.cat((keys[i], attn.k_proj(h).view(-1, cfg.num_key_value_heads, head)))
            values[i] = torch.cat((values[i],
                                   attn.v_proj(h).view(-1, cfg.num_key_value_heads, head)))
            x = x + attn.o_proj(_attention(q, keys[i], values[i], positions, rope, s, head))
            x = x + layer.mlp(layer.post_attention_layernorm(x))
        logits = model.lm_head(model.model.norm(x[-1:]))[0].float()
        logprobs.append(torch.log_softmax(logits, -1))
        token = int(logits.argmax())
        tokens.append(token)
        step_ids = torch.tensor([token])
    return tokens[len(prompt):], logprobs


def rope_of(hf_config: dict, original_max_position: int) -> DynamicRope:
    """The DynamicRope of a Llama config dict (NeoX pairs, full rotary, default betas)."""
    head = hf_config.get("head_dim") or hf_config["hidden_size"] // hf_config["num_attention_heads"]
    theta = hf_config.get("rope_theta") or hf_config.get("rope_parameters", {}).get("rope_theta")
    return DynamicRope(head, head, float(theta), original_max_position)
