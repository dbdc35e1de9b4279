"""Our rotary layer goes wherever vLLM's YaRN layer goes: every input layout vLLM's accepts,
dtype casts of the module, and the module cache of `get_rope` (issue 14, item 0).

Each case builds vLLM's own layer and ours from the same arguments and compares outputs."""

from __future__ import annotations

import pytest
import torch

import yarn_vllm
from conftest import TOL, native_vllm_ops

YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 2048,
        "rope_theta": 1e4}
HEAD, HQ, HK = 64, 4, 2


def _pair(dtype=torch.float32, is_neox=True):
    from vllm.model_executor.layers.rotary_embedding import _ROPE_DICT, get_rope

    yarn_vllm.register()
    _ROPE_DICT.clear()
    ours = get_rope(HEAD, 8192, is_neox, YARN, dtype)
    with native_vllm_ops():
        _ROPE_DICT.clear()
        native = get_rope(HEAD, 8192, is_neox, YARN, dtype)
    _ROPE_DICT.clear()
    return ours, native


LAYOUTS = {  # name: (positions shape, query shape, key shape)
    "tokens_flat": ((37,), (37, HQ * HEAD), (37, HK * HEAD)),
    "tokens_heads": ((37,), (37, HQ, HEAD), (37, HK, HEAD)),
    "batch_seq_flat": ((3, 11), (3, 11, HQ * HEAD), (3, 11, HK * HEAD)),
    "batch_seq_heads": ((3, 11), (3, 11, HQ, HEAD), (3, 11, HK, HEAD)),
    "batch_seq_positions_flat_tokens": ((3, 11), (33, HQ * HEAD), (33, HK * HEAD)),
}


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("with_key", [True, False])
def test_every_layout_of_vllms_layer(layout, with_key, vllm_config_ctx):
    ours, native = _pair()
    pos_shape, q_shape, k_shape = LAYOUTS[layout]
    g = torch.Generator().manual_seed(0)
    pos = torch.randint(0, 8192, pos_shape, generator=g)
    q = torch.randn(q_shape, generator=g)
    k = torch.randn(k_shape, generator=g) if with_key else None
    q1, k1 = ours.forward_native(pos, q.clone(), None if k is None else k.clone())
    q2, k2 = native.forward_native(pos, q.clone(), None if k is None else k.clone())
    assert q1.shape == q.shape
    torch.testing.assert_close(q1, q2, **TOL[torch.float32])
    if with_key:
        assert k1.shape == k.shape
        torch.testing.assert_close(k1, k2, **TOL[torch.float32])
    else:
        assert k1 is None and k2 is None


@pytest.mark.parametrize("cast", [lambda m: m.to(torch.bfloat16), lambda m: m.half(),
                                  lambda m: m.bfloat16(), lambda m: m.to("cpu", torch.float16),
                                  lambda m: m.double().float()],
                         ids=["to_bf16", "half", "bfloat16", "to_device_fp16", "double_float"])
def test_dtype_casts_keep_fp32_frequencies(cast, vllm_config_ctx):
    """vLLM's test casts the module; our fp32 inv_freq must survive (a round trip through
    bf16 would silently keep bf16 precision) and the layer must still match vLLM's."""
    ours, native = _pair()
    exact = ours.inv_freq.clone()
    cast(ours)
    assert ours.inv_freq.dtype == torch.float32 and torch.equal(ours.inv_freq, exact)
    assert ours.mscales.dtype == torch.float32
    pos = torch.arange(4000, 4100)
    q = torch.randn(100, HQ * HEAD).bfloat16()
    q1, _ = ours.forward_native(pos, q.clone(), None)
    q2, _ = native.forward_native(pos, q.float().clone(), None)
    torch.testing.assert_close(q1.float(), q2, **TOL[torch.bfloat16])


def test_get_rope_caches_one_module_per_setting(vllm_config_ctx):
    from vllm.model_executor.layers.rotary_embedding import _ROPE_DICT, get_rope

    yarn_vllm.register()
    _ROPE_DICT.clear()
    a = get_rope(HEAD, 8192, True, YARN, torch.float32)
    b = get_rope(HEAD, 8192, True, dict(YARN), torch.float32)
    c = get_rope(HEAD, 8192, True, dict(YARN, factor=2.0), torch.float32)
    _ROPE_DICT.clear()
    assert a is b and a is not c and c.scaling_factor == 2.0
