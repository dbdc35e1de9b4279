"""The YaRN maths against HF transformers' and vLLM's own implementations."""

from __future__ import annotations

import math
import types

import pytest
import torch

from yarn_vllm.yarn import yarn_math
from conftest import native_vllm_ops

FACTORS = [1.0, 1.5, 4.0, 32.0]
# (head_size, rotary_dim): full and partial rotary
DIMS = [(64, 64), (64, 32), (128, 128), (128, 64)]
THETAS = [1e4, 1e6]
# extra rope_parameters, each a variant the issue names
VARIANTS = {
    "default": {},
    "betas": {"beta_fast": 16, "beta_slow": 2},
    "no_truncate": {"truncate": False},
    "deepseek_mscale": {"mscale": 0.707, "mscale_all_dim": 0.707 * 1.3},
    "attention_factor": {"attention_factor": 1.25},
}


def hf_yarn(head_size, rotary_dim, theta, factor, original, extra):
    """HF transformers' _compute_yarn_parameters on an equivalent config."""
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import _compute_yarn_parameters

    params = {"rope_type": "yarn", "factor": factor, "rope_theta": theta,
              "original_max_position_embeddings": original,
              "partial_rotary_factor": rotary_dim / head_size, **extra}
    config = LlamaConfig(hidden_size=head_size * 4, num_attention_heads=4, head_dim=head_size,
                         max_position_embeddings=int(original * factor), rope_parameters=params)
    return _compute_yarn_parameters(config, "cpu")


def ours(rotary_dim, theta, factor, original, extra):
    inv_freq = yarn_math.yarn_inv_freq(rotary_dim, theta, factor, original,
                                       extra.get("beta_fast", 32), extra.get("beta_slow", 1),
                                       extra.get("truncate", True))
    mscale = yarn_math.yarn_mscale(factor, extra.get("mscale"), extra.get("mscale_all_dim"),
                                   extra.get("attention_factor"))
    return inv_freq, mscale


@pytest.mark.parametrize("factor", FACTORS)
@pytest.mark.parametrize("head_size,rotary_dim", DIMS)
@pytest.mark.parametrize("theta", THETAS)
@pytest.mark.parametrize("variant", VARIANTS)
def test_matches_hf_transformers(factor, head_size, rotary_dim, theta, variant):
    extra = VARIANTS[variant]
    hf_inv, hf_scale = hf_yarn(head_size, rotary_dim, theta, factor, 4096, extra)
    inv, mscale = ours(rotary_dim, theta, factor, 4096, extra)
    torch.testing.assert_close(inv, hf_inv.float(), rtol=1e-6, atol=0)
    assert mscale == pytest.approx(hf_scale, rel=1e-12)


@pytest.mark.parametrize("factor", FACTORS)
@pytest.mark.parametrize("head_size,rotary_dim", DIMS)
@pytest.mark.parametrize("theta", THETAS)
@pytest.mark.parametrize("variant", VARIANTS)
def test_matches_vllm_cos_sin_cache(factor, head_size, rotary_dim, theta, variant,
                                    vllm_config_ctx):
    """cos/sin from our inv_freq and mscale equal vLLM's table, up to positions near s x L."""
    from vllm.model_executor.layers.rotary_embedding.yarn_scaling_rope import (
        YaRNScalingRotaryEmbedding)

    original = 2048
    extra = VARIANTS[variant]
    with native_vllm_ops():
        native = YaRNScalingRotaryEmbedding(head_size, rotary_dim, original, theta, True, factor,
                                            torch.float32, **extra)
    assert type(native) is YaRNScalingRotaryEmbedding
    table = native.cos_sin_cache
    max_pos = int(factor * original)
    assert table.shape == (max_pos, rotary_dim)
    inv, mscale = ours(rotary_dim, theta, factor, original, extra)
    positions = torch.cat((torch.arange(0, 64), torch.arange(max_pos - 64, max_pos)))
    angles = torch.outer(positions.float(), inv)
    expected = torch.cat((angles.cos(), angles.sin()), -1) * mscale
    torch.testing.assert_close(expected, table[positions], rtol=0, atol=1e-6)


def test_ramp_bounds_follow_paper_definition():
    """Dimensions with more than beta_fast rotations over L keep theta_j; fewer than
    beta_slow get theta_j / s (Eq. 18), checked from r_j = L / lambda_j directly."""
    d, theta, s, L = 128, 1e4, 8.0, 4096
    base = yarn_math.rope_inv_freq(d, theta)
    inv = yarn_math.yarn_inv_freq(d, theta, s, L, truncate=False)
    rotations = L * base / (2 * math.pi)  # r_j = L / lambda_j
    keep, interp = rotations > 32, rotations < 1
    assert keep.any() and interp.any()
    torch.testing.assert_close(inv[keep], base[keep])
    torch.testing.assert_close(inv[interp], base[interp] / s)
    mid = ~(keep | interp)
    assert ((inv[mid] < base[mid]) & (inv[mid] > base[mid] / s)).all()


def test_mscale_and_attention_scale():
    assert yarn_math.get_mscale(1.0) == 1.0
    assert yarn_math.get_mscale(0.5) == 1.0
    assert yarn_math.yarn_mscale(4.0) == pytest.approx(0.1 * math.log(4) + 1)
    assert yarn_math.attention_scale(yarn_math.yarn_mscale(4.0)) == pytest.approx(
        (0.1 * math.log(4) + 1) ** 2)
    assert yarn_math.yarn_mscale(4.0, attention_factor=0.9) == 0.9


def test_dynamic_factor():
    assert yarn_math.dynamic_factor(100, 1024) == 1.0
    assert yarn_math.dynamic_factor(4096, 1024) == 4.0
    lens = torch.tensor([10, 1024, 3072])
    torch.testing.assert_close(yarn_math.dynamic_factor(lens, 1024), torch.tensor([1.0, 1.0, 3.0]))
    # headroom 2 and factor 4: twice the needed scale, capped at 4 unless the length needs more
    lens = torch.tensor([100, 1024, 1536, 3072, 6144])
    expected = [1.0, 2.0, 3.0, 4.0, 6.0]
    assert [yarn_math.dynamic_factor(int(n), 1024, 2.0, 4.0) for n in lens] == expected
    torch.testing.assert_close(yarn_math.dynamic_factor(lens, 1024, 2.0, 4.0),
                               torch.tensor(expected))
