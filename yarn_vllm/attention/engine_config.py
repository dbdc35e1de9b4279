"""What dynamic mode changes in vLLM's engine configuration, applied at config time.

vLLM calls the platform's `check_and_update_config` while it builds a
VllmConfig (before the scheduler or any worker exists); the plugin wraps that
hook so that a model whose rope_parameters say `yarn_mode: dynamic` gets:

  * our pre-RoPE attention backend (AttentionBackendEnum.CUSTOM);
  * no chunked prefill, and a token budget of at least max_model_len, so that a
    prompt is prefilled in one step at the scale of its full length (chunks
    would each see a different scale, and results would follow the scheduler);
  * no prefix caching: a cached block's keys at layers >= 1 depend on the scale
    they were computed at, which another request may not share.

vLLM's CPU platform makes the same two scheduler changes for MLA models.
Static mode and models without YaRN are left exactly as they were.
"""

from __future__ import annotations

import logging

from yarn_vllm.config import YarnConfig, rope_parameters_of
from yarn_vllm.errors import UserError

logger = logging.getLogger("yarn_vllm")

BACKEND_PATH = "yarn_vllm.attention.backend.YarnDynamicAttentionBackend"

# Decoders whose every attention layer applies the model's one YaRN RoPE through
# `rotary_emb(positions, q, k)` and nothing else: the backend may then own RoPE.
# Others (RoPE-less layers, MLA, models reading cos_sin_cache) would be silently wrong.
DYNAMIC_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM",
                         "Qwen3ForCausalLM", "Qwen2MoeForCausalLM", "Qwen3MoeForCausalLM")

_FIX_STATIC = "serve it with yarn_mode 'static' (rope_parameters, --hf-overrides or --yarn-mode)"


def wants_dynamic(vllm_config) -> bool:
    """True when the model's rope_parameters say yarn_mode 'dynamic'.

    Nothing else is read or validated: every other model, whatever its RoPE, must
    pass through the plugin's config hook untouched.
    """
    model_config = getattr(vllm_config, "model_config", None)
    hf_config = getattr(model_config, "hf_config", None)
    if hf_config is None:
        return False
    return rope_parameters_of(hf_config).get("yarn_mode") == "dynamic"


def _refuse_unsupported(vllm_config) -> None:
    model = vllm_config.model_config
    archs = list(getattr(model.hf_config, "architectures", None) or [])
    if not set(archs) & set(DYNAMIC_ARCHITECTURES):
        raise UserError("architectures", f"is {archs}, which Dynamic YaRN does not cover "
                              f"(it covers {', '.join(DYNAMIC_ARCHITECTURES)})", _FIX_STATIC)
    if getattr(model, "use_mla", False):
        raise UserError("yarn_mode", "is 'dynamic' for an MLA model", _FIX_STATIC)
    if vllm_config.speculative_config is not None:
        raise UserError("speculative_config", "is set; draft tokens would move each "
                              "sequence's scale", "drop speculative decoding, or " + _FIX_STATIC)
    if vllm_config.attention_config.backend_per_kind:
        raise UserError("attention_config.backend_per_kind", "routes layers to other "
                              "backends, which would see keys without RoPE",
                              "drop it, or " + _FIX_STATIC)


def configure_dynamic(vllm_config) -> None:
    """Adjust `vllm_config` in place for dynamic mode; a no-op otherwise."""
    if not wants_dynamic(vllm_config):
        return
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    YarnConfig.from_hf_config(vllm_config.model_config.hf_config)  # raises naming the field
    _refuse_unsupported(vllm_config)

    from vllm.model_executor.custom_op import op_registry_oot

    from yarn_vllm.rotary import YarnRotaryEmbedding

    if op_registry_oot.get("YaRNScalingRotaryEmbedding") is not YarnRotaryEmbedding:
        raise UserError("yarn_mode", "is 'dynamic', but yarn-vllm's rotary layer is not "
                              "active (no compiled kernel for this platform)",
                              "rebuild yarn-vllm with its extension (pip install "
                              "--no-build-isolation -e .) or use yarn_mode 'static'")
    attention = vllm_config.attention_config
    if attention.backend not in (None, AttentionBackendEnum.CUSTOM):
        raise UserError("attention_backend", f"is {attention.backend.name}, but yarn_mode "
                              "'dynamic' needs yarn-vllm's pre-RoPE backend",
                              "drop --attention-backend (or use yarn_mode 'static')")
    if AttentionBackendEnum.CUSTOM.get_path() != BACKEND_PATH:
        raise UserError("attention_backend", "CUSTOM is registered by another plugin",
                              "disable that plugin to serve yarn_mode 'dynamic'")
    attention.backend = AttentionBackendEnum.CUSTOM
    scheduler, cache = vllm_config.scheduler_config, vllm_config.cache_config
    max_len = vllm_config.model_config.max_model_len
    changes = []
    if scheduler.enable_chunked_prefill:
        scheduler.enable_chunked_prefill = False
        changes.append("chunked prefill off")
    if scheduler.max_num_batched_tokens < max_len:
        scheduler.max_num_batched_tokens = max_len
        changes.append(f"max_num_batched_tokens={max_len}")
    if cache.enable_prefix_caching:
        cache.enable_prefix_caching = False
        changes.append("prefix caching off")
    _allow_long_steps()
    logger.info("yarn_vllm: Dynamic YaRN: pre-RoPE attention backend%s",
                f"; {', '.join(changes)} (each prompt is prefilled in one step at its own "
                "scale, and cached blocks are not shared across scales)" if changes else "")


def _allow_long_steps() -> None:
    """Let one step run as long as a whole prompt's prefill takes on a CPU.

    vLLM's executor gives a step VLLM_EXECUTE_MODEL_TIMEOUT_SECONDS (300 s) and then
    kills the engine; a 16k prompt prefilled in one step took longer than that on a
    busy 2-core CPU. Set here, before the engine core starts, so its processes inherit
    it; a value the user set is kept.
    """
    import os

    from vllm.platforms import current_platform

    if current_platform.device_type == "cpu":
        os.environ.setdefault("VLLM_EXECUTE_MODEL_TIMEOUT_SECONDS", "7200")
