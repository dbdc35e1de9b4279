"""A tiny random Llama with RoPE, for tests and the no-download demo.

It has the real architecture (GQA, RoPE, SwiGLU) at toy size, so vLLM, HF
transformers and our references can all run it in seconds on a CPU.
"""

from __future__ import annotations

import os


def make_tiny_llama(path: str, *, original_max_position: int = 1024, rope_theta: float = 10000.0,
                    vocab_size: int = 512, seed: int = 0, init_std: float = 0.1) -> str:
    """Save a random 2-layer Llama (hidden 256, 4 q / 2 kv heads of 64) to `path`.

    `init_std` above the usual 0.02 gives peaked next-token distributions, so
    greedy decoding is decided by clear margins rather than by rounding.
    Returns `path`. Reuses an existing folder written with the same settings.
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    if os.path.exists(os.path.join(path, "config.json")):
        return path
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=64,
        max_position_embeddings=original_max_position, rope_theta=rope_theta,
        initializer_range=init_std, tie_word_embeddings=False,
        bos_token_id=0, eos_token_id=1, pad_token_id=None)
    model = LlamaForCausalLM(config).to(torch.float32)
    model.save_pretrained(path, safe_serialization=True)
    return path


# A chat template with no model-specific tokens: each message on its own line after its role.
TINY_CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
                      "{% if add_generation_prompt %}<|assistant|>{% endif %}")


def add_tiny_tokenizer(path: str, vocab_size: int = 512) -> str:
    """Save a byte-level tokenizer with a chat template beside the tiny model in `path`, so
    that a server can take chat requests: ids 0 and 1 are <s> and </s> (the model's BOS and
    EOS), then the 256 bytes, then unused tokens up to `vocab_size`. Returns `path`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    if os.path.exists(os.path.join(path, "tokenizer.json")):
        return path
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {"<s>": 0, "</s>": 1}
    vocab.update({ch: 2 + i for i, ch in enumerate(sorted(alphabet))})
    vocab.update({f"<unused_{i}>": i for i in range(len(vocab), vocab_size)})
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>")
    fast.chat_template = TINY_CHAT_TEMPLATE
    fast.save_pretrained(path)
    return path
