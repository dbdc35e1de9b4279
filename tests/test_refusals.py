"""Every refusal of the per-sequence YaRN modes, each a one-line message naming the field and
the fix, driven through the real code paths: vLLM's own config build
(EngineArgs(...).create_engine_config(), which calls our hook, engine_config.configure),
the rotary layer's constructor under that config, and the dynamic backend's impl.

Request mode shares the model-level refusals (architecture, MLA, speculative decoding,
prefill context parallelism, the rotary layer not active, rotary layers that disagree);
the attention-level ones (backend_per_kind, the CUSTOM backend, the impl's features) are
dynamic mode's only, and request mode is shown to accept what only dynamic mode refuses.
"""

from __future__ import annotations

import json
import os

import pytest
import torch

from conftest import native_vllm_ops
from yarn_vllm.yarn.config import YarnConfig
from yarn_vllm.errors import UserError
from yarn_vllm.ops import HAS_EXTENSION

pytestmark = pytest.mark.skipif(not HAS_EXTENSION, reason="yarn_vllm._C not built")
MODES = ("dynamic", "request")


@pytest.fixture(scope="module", autouse=True)
def registered():
    import yarn_vllm

    yarn_vllm.register()


@pytest.fixture(scope="module")
def tiny_mla(tmp_path_factory):
    """A DeepSeek-V2-shaped MLA config with YaRN (as DeepSeek-V2 ships it); no weights needed."""
    from transformers import DeepseekV2Config

    path = str(tmp_path_factory.mktemp("tiny_mla"))
    config = DeepseekV2Config(
        vocab_size=512, hidden_size=256, intermediate_size=512, moe_intermediate_size=128,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4, kv_lora_rank=64,
        q_lora_rank=None, qk_rope_head_dim=32, qk_nope_head_dim=32, v_head_dim=64,
        n_routed_experts=4, num_experts_per_tok=2, max_position_embeddings=16384,
        rope_parameters={"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0,
                         "original_max_position_embeddings": 4096, "mscale": 0.707,
                         "mscale_all_dim": 0.707})
    config.architectures = ["DeepseekV2ForCausalLM"]
    config.save_pretrained(path)
    return path


def _overrides(model_dir: str, mode: str) -> dict:
    with open(os.path.join(model_dir, "config.json")) as f:
        hf = json.load(f)
    overrides = YarnConfig(factor=4.0, mode=mode).hf_overrides(hf)
    params = hf.get("rope_parameters") or {}
    for key in ("mscale", "mscale_all_dim"):  # keep a model's own YaRN magnitudes
        if key in params:
            overrides["rope_parameters"][key] = params[key]
    return overrides


def _build(model_dir: str, mode: str, overrides: dict | None = None, **engine_args):
    from vllm.engine.arg_utils import EngineArgs

    hf_overrides = {**_overrides(model_dir, mode), **(overrides or {})}
    return EngineArgs(model=model_dir, hf_overrides=hf_overrides, skip_tokenizer_init=True,
                      max_model_len=hf_overrides["max_position_embeddings"],
                      **engine_args).create_engine_config()


def _refusal(excinfo) -> UserError:
    """Our UserError, also when vLLM's pydantic config wrapped it (ValidationError)."""
    err = excinfo.value
    if not isinstance(err, UserError) and hasattr(err, "errors"):
        err = err.errors()[0].get("ctx", {}).get("error", err)
    assert isinstance(err, UserError), repr(err)
    return err


def _assert_one_line(err: Exception, field: str, *phrases: str) -> None:
    message = str(err)
    assert "\n" not in message, message
    assert f"`{field}`" in message and "Fix: " in message, message
    for phrase in phrases:
        assert phrase in message, message


# ---- the model-level refusals, shared by dynamic and request mode ----------------------

# engine argument -> (the field the refusal names, a phrase it must hold)
ENGINE_REFUSALS = {
    "speculative_config": ({"method": "ngram", "num_speculative_tokens": 2,
                            "prompt_lookup_max": 3, "prompt_lookup_min": 1},
                           "speculative_config", "yarn_mode 'static'"),
    "runner": ("pooling", "yarn_mode", "pooling (embedding) model"),
    "kv_transfer_config": ({"kv_connector": "ExampleConnector", "kv_role": "kv_both"},
                           "kv_transfer_config", "yarn_mode 'static'"),
    "prefill_context_parallel_size": (2, "prefill_context_parallel_size", "yarn_mode 'static'"),
}


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("argument", ENGINE_REFUSALS)
def test_engine_settings_the_per_sequence_modes_cannot_serve_are_refused(tiny_llama, mode,
                                                                          argument):
    value, field, phrase = ENGINE_REFUSALS[argument]
    with pytest.raises(ValueError) as e:
        _build(tiny_llama, mode, **{argument: value})
    _assert_one_line(_refusal(e), field, phrase)


@pytest.mark.parametrize("mode", MODES)
def test_another_scheduler_is_refused_and_ours_is_named(tiny_llama, mode):
    with pytest.raises(ValueError) as e:
        _build(tiny_llama, mode, scheduler_cls="vllm.v1.core.sched.scheduler.Scheduler")
    _assert_one_line(_refusal(e), "scheduler_cls", "yarn-vllm's scheduler")
    config = _build(tiny_llama, mode)
    assert config.scheduler_config.scheduler_cls == "yarn_vllm.vllm_seam.scheduler.YarnScheduler"
    assert _build(tiny_llama, "static").scheduler_config.scheduler_cls is None


@pytest.mark.parametrize("mode", MODES)
def test_an_mla_model_is_refused(tiny_mla, mode):
    """A real MLA model is refused by its architecture; should its config name an architecture
    we cover (here Llama's) while vLLM sees MLA (model_type deepseek_v2), the MLA guard."""
    with pytest.raises(ValueError) as e:
        _build(tiny_mla, mode)
    _assert_one_line(_refusal(e), "architectures", "DeepseekV2ForCausalLM", "yarn_mode 'static'")
    with pytest.raises(ValueError) as e:
        _build(tiny_mla, mode, {"architectures": ["LlamaForCausalLM"]})
    _assert_one_line(_refusal(e), "yarn_mode", "MLA model", "yarn_mode 'static'")


class _OtherPluginsRotary(torch.nn.Module):
    """Stands for another plugin's YaRNScalingRotaryEmbedding replacement."""


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("owner", ["nobody", "another plugin"])
def test_the_rotary_layer_not_active_is_refused(tiny_llama, mode, owner):
    """Without our kernels (register() then leaves vLLM's layer in place), or with the op
    name taken by another plugin, the per-sequence modes cannot run."""
    from vllm.model_executor.custom_op import op_registry_oot

    from yarn_vllm.vllm_seam.engine_settings import ROTARY_OP_NAME

    with native_vllm_ops():  # empties vLLM's out-of-tree registry, restores it afterwards
        if owner == "another plugin":
            op_registry_oot[ROTARY_OP_NAME] = _OtherPluginsRotary
        with pytest.raises(ValueError) as e:
            _build(tiny_llama, mode)
    _assert_one_line(_refusal(e), "yarn_mode", "rotary layer is not active")
    assert _build(tiny_llama, mode) is not None  # and with ours back, the same config builds


@pytest.mark.parametrize("mode", MODES)
def test_rotary_layers_that_disagree_with_the_model_are_refused(tiny_llama, mode):
    """The backend and the admission read the model's policy; a rotary layer built with other
    YaRN settings (here beta_fast 16 where the model says 32) would rotate otherwise."""
    from vllm.config import set_current_vllm_config

    from yarn_vllm.vllm_seam.rotary import YarnRotaryEmbedding

    config = _build(tiny_llama, mode)
    with set_current_vllm_config(config):
        YarnRotaryEmbedding(64, 64, 1024, 10000.0, True, 4.0, torch.float32)  # the model's own
        with pytest.raises(UserError) as e:
            YarnRotaryEmbedding(64, 64, 1024, 10000.0, True, 4.0, torch.float32, beta_fast=16)
        _assert_one_line(e.value, "rope_parameters", f"yarn_mode {mode!r}", "yarn_mode 'static'")
        if mode == "dynamic":  # the backend rotates NeoX pairs only
            with pytest.raises(UserError) as e:
                YarnRotaryEmbedding(64, 64, 1024, 10000.0, False, 4.0, torch.float32)
            _assert_one_line(e.value, "is_neox_style", "yarn_mode 'static'")


# ---- dynamic mode's attention-level refusals ----------------------------------------------

def test_backend_per_kind_is_refused_in_dynamic_mode_only(tiny_llama):
    per_kind = {"backend_per_kind": {"full_attention": "CPU_ATTN"}}
    with pytest.raises(ValueError) as e:
        _build(tiny_llama, "dynamic", attention_config=per_kind)
    _assert_one_line(_refusal(e), "attention_config.backend_per_kind", "yarn_mode 'static'")
    # request mode runs on vLLM's own attention: any backend routing is fine there
    assert _build(tiny_llama, "request", attention_config=per_kind) is not None


def test_a_custom_backend_owned_by_another_plugin_is_refused(tiny_llama):
    from vllm.v1.attention.backends.registry import AttentionBackendEnum, register_backend

    from yarn_vllm.vllm_seam.engine_settings import BACKEND_PATH

    register_backend(AttentionBackendEnum.CUSTOM, "other_plugin.attention.TheirBackend")
    try:
        with pytest.raises(ValueError) as e:
            _build(tiny_llama, "dynamic")
        _assert_one_line(_refusal(e), "attention_backend", "another plugin")
        assert _build(tiny_llama, "request") is not None  # request mode does not use CUSTOM
    finally:
        register_backend(AttentionBackendEnum.CUSTOM, BACKEND_PATH)
    assert _build(tiny_llama, "dynamic").attention_config.backend.name == "CUSTOM"


def _impl(**changes):
    from yarn_vllm.attention.backend import YarnDynamicAttentionImpl

    args = {"num_heads": 32, "head_size": 64, "scale": 0.125, "num_kv_heads": 8,
            "alibi_slopes": None, "sliding_window": None, "kv_cache_dtype": "auto", **changes}
    return YarnDynamicAttentionImpl(**args)


@pytest.mark.parametrize("field,value", [
    ("alibi_slopes", torch.tensor([0.5, 0.25])),
    ("alibi_slopes", torch.rand(32)),                                 # BLOOM/MPT: 32 heads
    ("logits_soft_cap", 30.0),                                        # Gemma 2
    ("sinks", torch.zeros(2)),
    ("sinks", torch.zeros(64)),                                       # gpt-oss: 64 heads
    ("attn_type", "encoder"),
    ("attn_type", "encoder_only"),
    ("attn_type", "encoder_decoder"),
    ("sliding_window", 4096),
    ("kv_cache_dtype", "fp8"),
])
def test_the_dynamic_backend_refuses_what_it_does_not_implement(field, value):
    with pytest.raises(UserError) as e:
        _impl(**{field: value})
    _assert_one_line(e.value, field, "yarn_mode 'static'")


@pytest.mark.parametrize("attn_type", ["encoder", "encoder_only", "encoder_decoder"])
def test_vllms_selector_is_told_non_decoder_layers_are_not_ours(attn_type):
    from yarn_vllm.attention.backend import YarnDynamicAttentionBackend

    assert not YarnDynamicAttentionBackend.supports_attn_type(attn_type)
    assert YarnDynamicAttentionBackend.supports_attn_type("decoder")


@pytest.mark.parametrize("scale", ["output_scale", "output_block_scale"])
def test_fused_output_quantization_is_refused(scale):
    """vLLM fuses output quantization only into a backend that says it supports it (ours does
    not), so this is the backstop: a forward asked to quantize its output."""
    impl = _impl()
    assert not impl.fused_output_quant_supported(None)
    q = torch.zeros(1, 32, 64)
    with pytest.raises(UserError) as e:
        impl.forward(None, q, q[:, :8], q[:, :8], torch.zeros(1, 8, 32, 128), None,
                     torch.zeros(1, 32 * 64), **{scale: torch.ones(1)})
    _assert_one_line(e.value, scale, "yarn_mode 'static'")
