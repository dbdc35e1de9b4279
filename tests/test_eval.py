"""Evaluation machinery at small sizes, on the real default model where it matters."""

from __future__ import annotations

import math

import pytest
import torch

from yarn_vllm.eval.perplexity import aggregate, default_bucket_edges, sliding_windows
from yarn_vllm.methods import method_overrides

SMOL = {"model_type": "llama", "hidden_size": 576, "num_attention_heads": 9, "head_dim": 64,
        "max_position_embeddings": 8192, "rope_parameters": {"rope_type": "default",
                                                             "rope_theta": 100000.0}}


def test_sliding_windows_score_each_token_once():
    for n, w, s in [(100, 10, 10), (100, 10, 3), (37, 8, 5)]:
        wins = sliding_windows(n, w, s)
        scored = [p for x in wins for p in range(x.score_from, x.end)]
        # every token some window can predict (it has a predecessor in that window), once
        predictable = sorted({p for x in wins for p in range(x.begin + 1, x.end)})
        assert scored == predictable
        if s < w:  # overlapping windows leave no gaps
            assert scored == list(range(1, wins[-1].end))
        assert all(x.end - x.begin == w for x in wins)


def test_sliding_windows_refuses_short_text():
    with pytest.raises(ValueError, match="fewer than the window"):
        sliding_windows(100, 200, 200)


def test_aggregate_matches_direct_computation():
    wins = sliding_windows(12, 6, 3)
    nll = [[0.1 * (i + 1) + 0.01 * k for i in range(5)] for k in range(len(wins))]
    out = aggregate(wins, nll, [0, 3, 6])
    kept = [v for x, row in zip(wins, nll) for off, v in enumerate(row, 1)
            if x.begin + off >= x.score_from]
    assert out["tokens_scored"] == len(kept) == 11
    assert out["ppl"] == pytest.approx(math.exp(sum(kept) / len(kept)))
    assert sum(b["tokens"] for b in out["buckets"]) == 11


def test_default_buckets():
    assert default_bucket_edges(8192) == [0, 1024, 2048, 4096, 8192]


def test_method_overrides():
    assert method_overrides("trained", SMOL, 4) == {"max_position_embeddings": 32768}
    pi = method_overrides("pi", SMOL, 2)["rope_parameters"]
    assert pi["rope_type"] == "linear" and pi["factor"] == 2.0
    ntk = method_overrides("ntk", SMOL, 4)["rope_parameters"]
    assert ntk["rope_theta"] == pytest.approx(1e5 * 4 ** (64 / 62))
    yarn = method_overrides("yarn", SMOL, 4)
    assert yarn["rope_parameters"]["rope_type"] == "yarn"
    assert yarn["max_position_embeddings"] == 32768
    with pytest.raises(ValueError, match="unknown"):
        method_overrides("rope-magic", SMOL, 2)


def test_ntk_method_is_eq15_in_vllm_and_hf():
    """NTK-aware as a scaled base: HF's inv_freq with that base equals the paper's Eq. 15
    (theta_j' = (b s^(d/(d-2)))^(-2j/d)) computed directly."""
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS  # noqa: F401

    params = method_overrides("ntk", SMOL, 4)["rope_parameters"]
    d = 64
    direct = (1e5 * 4 ** (d / (d - 2))) ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
    cfg = LlamaConfig(hidden_size=576, num_attention_heads=9, head_dim=64,
                      rope_parameters=params)
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding
    inv = LlamaRotaryEmbedding(cfg).inv_freq
    torch.testing.assert_close(inv.double(), direct, rtol=1e-6, atol=0)


def test_passkey_prompt_is_exact_and_checkable(smol_model):
    from transformers import AutoTokenizer

    from yarn_vllm.tasks.passkey import make_passkey_prompt

    tok = AutoTokenizer.from_pretrained(smol_model)
    p = make_passkey_prompt(tok, 1000, 0.5, seed=3)
    assert len(p.token_ids) == 1000
    text = tok.decode(p.token_ids)
    assert f"The pass key is {p.key}" in text
    assert text.index(p.key) > len(text) // 4
    assert p.is_found(f" {p.key}. Remember") and not p.is_found(" 12") and not p.is_found("no")
    with pytest.raises(ValueError, match="too short"):
        make_passkey_prompt(tok, 20, 0.5, seed=0)


@pytest.fixture(scope="session")
def smol_hf_ppl(smol_model):
    """HF transformers perplexity on the same windows, YaRN s=2, fp32: the reference."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from yarn_vllm.eval.run import default_text

    config = AutoConfig.from_pretrained(smol_model)
    for k, v in method_overrides("yarn", config.to_dict(), 2.0).items():
        setattr(config, k, v)
    model = AutoModelForCausalLM.from_pretrained(smol_model, config=config,
                                                 dtype=torch.float32).eval()
    ids = AutoTokenizer.from_pretrained(smol_model).encode(default_text(),
                                                           add_special_tokens=False)
    out = {}
    for w in (512, 2048):
        x = torch.tensor([ids[:w]])
        with torch.no_grad():
            logits = model(x).logits[0, :-1].float()
        nll = torch.nn.functional.cross_entropy(logits, x[0, 1:])
        out[w] = math.exp(nll.item())
    return out


def test_vllm_perplexity_matches_hf_within_1_percent(smol_model, smol_hf_ppl):
    from yarn_vllm.eval.run import eval_perplexity

    res = eval_perplexity(smol_model, ["yarn"], [512, 2048], factor=2.0,
                          llm_kwargs={"dtype": "float32", "enforce_eager": True})
    r = res["methods"]["yarn"]["ppl"]
    for w in (512, 2048):
        assert r[str(w)]["tokens_scored"] == w - 1
        assert r[str(w)]["ppl"] == pytest.approx(smol_hf_ppl[w], rel=0.01)
