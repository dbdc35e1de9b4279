"""The plugin: entry point, idempotent registration, and vLLM's factory handing out our layer."""

from __future__ import annotations

from importlib.metadata import entry_points

import pytest
import torch

import yarn_vllm
from yarn_vllm.vllm_seam.rotary import YarnRotaryEmbedding
from conftest import TOL, native_vllm_ops

YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 2048,
        "rope_theta": 1e4}


def test_compiled_extension_is_built():
    """The kernel tests skip without yarn_vllm._C; a silently failed build must fail here
    instead (set YARN_VLLM_SKIP_EXT=1 to test the pure-PyTorch package on purpose)."""
    import os

    from yarn_vllm.ops import HAS_EXTENSION, extension_supports

    if os.environ.get("YARN_VLLM_SKIP_EXT") == "1":
        pytest.skip("YARN_VLLM_SKIP_EXT=1: the pure-PyTorch package is under test")
    assert HAS_EXTENSION and extension_supports(torch.device("cpu"))


def test_entry_point_is_declared():
    eps = {ep.name: ep.value for ep in entry_points(group="vllm.general_plugins")}
    assert eps.get("yarn_vllm") == "yarn_vllm:register"


def test_loading_plugins_twice_is_harmless():
    import vllm.plugins as plugins
    from vllm.model_executor.custom_op import op_registry_oot

    for _ in range(2):
        plugins.plugins_loaded = False  # vLLM loads once per process; force a second load
        plugins.load_general_plugins()
        yarn_vllm.register()
    assert op_registry_oot["YaRNScalingRotaryEmbedding"] is YarnRotaryEmbedding


@pytest.mark.parametrize("head_size,rotary_dim", [(64, 64), (128, 64)])
@pytest.mark.parametrize("is_neox", [True, False])
def test_get_rope_returns_ours_and_matches_vllm(head_size, rotary_dim, is_neox, vllm_config_ctx):
    from vllm.model_executor.layers.rotary_embedding import _ROPE_DICT, get_rope
    from vllm.model_executor.layers.rotary_embedding.yarn_scaling_rope import (
        YaRNScalingRotaryEmbedding)

    yarn_vllm.register()
    params = dict(YARN, partial_rotary_factor=rotary_dim / head_size)
    _ROPE_DICT.clear()
    ours = get_rope(head_size, 8192, is_neox, params, torch.float32)
    assert type(ours) is YarnRotaryEmbedding
    assert isinstance(ours, YaRNScalingRotaryEmbedding)
    with native_vllm_ops():
        _ROPE_DICT.clear()
        native = get_rope(head_size, 8192, is_neox, params, torch.float32)
    _ROPE_DICT.clear()
    assert type(native) is YaRNScalingRotaryEmbedding

    gen = torch.Generator().manual_seed(0)
    pos = torch.randint(0, 8192, (333,), generator=gen)
    q = torch.randn(333, 9 * head_size, generator=gen)
    k = torch.randn(333, 3 * head_size, generator=gen)
    q1, k1 = ours(pos, q.clone(), k.clone())
    q2, k2 = native.forward_native(pos, q.clone(), k.clone())
    torch.testing.assert_close(q1, q2, **TOL[torch.float32])
    torch.testing.assert_close(k1, k2, **TOL[torch.float32])
    # vLLM code that reads the table directly gets vLLM's own values
    torch.testing.assert_close(ours.cos_sin_cache, native.cos_sin_cache, atol=1e-6, rtol=0)


def test_bf16_layer_matches_vllm_within_bf16_tolerance(vllm_config_ctx):
    """In bf16 vLLM rounds its cos/sin table to bf16; we keep fp32 trig. Both sit within
    bf16 tolerance of the fp32 reference, ours closer."""
    from vllm.model_executor.layers.rotary_embedding import _ROPE_DICT, get_rope
    from yarn_vllm.ops import rotary_reference

    yarn_vllm.register()
    _ROPE_DICT.clear()
    ours = get_rope(64, 8192, True, YARN, torch.bfloat16)
    with native_vllm_ops():
        _ROPE_DICT.clear()
        native = get_rope(64, 8192, True, YARN, torch.bfloat16)
    _ROPE_DICT.clear()
    pos = torch.arange(8192 - 257, 8192)
    q = torch.randn(257, 4 * 64).bfloat16()
    ref = rotary_reference(q.view(257, 4, 64), pos, ours.inv_freq[0], ours.mscale).view(257, -1)
    q_ours, _ = ours(pos, q.clone(), None)
    q_native, _ = native.forward_cpu(pos, q.clone(), None)
    err_ours = (q_ours.float() - ref).abs().max().item()
    err_native = (q_native.float() - ref).abs().max().item()
    torch.testing.assert_close(q_ours.float(), ref, **TOL[torch.bfloat16])
    # vLLM rounds cos/sin to bf16 first, so it may err by a few ulps more
    assert err_native <= 8 * 2.0 ** -8 * ref.abs().max().item()
    assert err_ours <= err_native


def test_bad_rotary_dim_is_refused_with_a_clear_error(vllm_config_ctx):
    from yarn_vllm.errors import UserError

    with pytest.raises(UserError, match="rotary_dim"):
        YarnRotaryEmbedding(64, 33, 2048, 1e4, True, 4.0, torch.float32)


def test_without_extension_vllm_keeps_its_own_layer():
    """With yarn_vllm._C missing the plugin steps aside (vLLM's layer serves) and says so."""
    import subprocess
    import sys

    code = (
        "import sys; sys.modules['yarn_vllm._C'] = None\n"
        "import yarn_vllm\n"
        "from vllm.model_executor.custom_op import op_registry_oot\n"
        "yarn_vllm.register()\n"
        "print('registered' if 'YaRNScalingRotaryEmbedding' in op_registry_oot else 'vllm-layer')\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "vllm-layer"
    assert "no compiled rotary kernel" in out.stdout + out.stderr  # vLLM's log goes to stdout
