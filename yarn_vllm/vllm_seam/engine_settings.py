"""What each YaRN mode changes in vLLM's engine configuration, applied at config time.

vLLM calls the platform's `check_and_update_config` while it builds a VllmConfig
(before the scheduler or any worker exists); the plugin wraps that hook
(yarn_vllm.vllm_seam.plugin) so that every model whose config asks for YaRN is validated
through YarnConfig, whatever the mode, and a config.json or --hf-overrides that
makes no sense (an unknown yarn_mode, a NaN factor) is refused before any
weight loads. Then:

  static   nothing changes.
  request  nothing changes either: vLLM's own attention, chunked prefill and prefix
           caching stay on (yarn_vllm.vllm_seam.request_scales keeps them exact). Refused:
           what would feed our rotary layers tokens in another order than the
           model runner's batch (speculative decoding, prefill context parallelism).
  dynamic  our pre-RoPE attention backend (AttentionBackendEnum.CUSTOM). Chunked
           prefill and prefix caching stay as the user set them, and exact: every
           chunk of a prompt runs at s(P), the scale of a one-step prefill
           (scale_policy), and a request's blocks are salted with s(P) (admission).

Models without YaRN are left exactly as they were.
"""

from __future__ import annotations

import logging
import os

from yarn_vllm.yarn.config import YarnConfig
from yarn_vllm.errors import UserError

logger = logging.getLogger("yarn_vllm")

BACKEND_PATH = "yarn_vllm.attention.backend.YarnDynamicAttentionBackend"
ROTARY_OP_NAME = "YaRNScalingRotaryEmbedding"

# Decoders whose every attention layer applies the model's one YaRN RoPE through
# `rotary_emb(positions, q, k)` over the runner's tokens, and nothing else: the
# per-sequence modes may then own RoPE. Others (RoPE-less layers, MLA, models
# reading cos_sin_cache) would be silently wrong.
PER_SEQUENCE_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM",
                              "Qwen3ForCausalLM", "Qwen2MoeForCausalLM", "Qwen3MoeForCausalLM")

_FIX_STATIC = "serve it with yarn_mode 'static' (rope_parameters, --hf-overrides or --yarn-mode)"


def served_yarn(vllm_config) -> YarnConfig | None:
    """The validated YaRN settings of the model being configured, or None without YaRN."""
    hf_config = getattr(getattr(vllm_config, "model_config", None), "hf_config", None)
    yarn = None if hf_config is None else YarnConfig.of_model(hf_config)
    return None if yarn is None else yarn.resolve(hf_config)


def configure(vllm_config) -> None:
    """Validate and adjust `vllm_config` in place for its YaRN mode; a no-op without YaRN."""
    yarn = served_yarn(vllm_config)  # raises UserError naming the field
    if yarn is None or yarn.mode == "static":
        return
    _refuse_unsupported(vllm_config, yarn.mode)
    if yarn.mode == "dynamic":
        _configure_dynamic(vllm_config)
    else:
        logger.info("yarn_vllm: request mode: one YaRN scale per request from %s; vLLM's "
                    "attention, chunked prefill and prefix caching stay on",
                    list(yarn.scales_on_offer()))


def _refuse_unsupported(vllm_config, mode: str) -> None:
    from vllm.model_executor.custom_op import op_registry_oot

    from yarn_vllm.vllm_seam.rotary import YarnRotaryEmbedding

    model = vllm_config.model_config
    archs = list(getattr(model.hf_config, "architectures", None) or [])
    if not set(archs) & set(PER_SEQUENCE_ARCHITECTURES):
        raise UserError("architectures", f"is {archs}, which yarn_mode {mode!r} does not cover "
                        f"(it covers {', '.join(PER_SEQUENCE_ARCHITECTURES)})", _FIX_STATIC)
    if model.use_mla:
        raise UserError("yarn_mode", f"is {mode!r} for an MLA model", _FIX_STATIC)
    if vllm_config.speculative_config is not None:
        raise UserError("speculative_config", "is set; draft tokens would run through the "
                        "rotary layers outside the scheduled batch, at no request's scale",
                        "drop speculative decoding, or " + _FIX_STATIC)
    if model.runner_type == "pooling":
        raise UserError("yarn_mode", f"is {mode!r} for a pooling (embedding) model, which "
                        "yarn-vllm serves only in static mode", _FIX_STATIC)
    if vllm_config.kv_transfer_config is not None:
        raise UserError("kv_transfer_config", f"is set in yarn_mode {mode!r}; a prefill node "
                        "would fix the scale without the request's decode, and a decode node "
                        "would take KV computed at another scale",
                        "drop disaggregated prefill, or " + _FIX_STATIC)
    if vllm_config.parallel_config.prefill_context_parallel_size > 1:
        raise UserError("prefill_context_parallel_size", "is above 1; it reorders a prefill's "
                        "tokens across ranks", "drop it, or " + _FIX_STATIC)
    owner = op_registry_oot.get(ROTARY_OP_NAME)
    if owner is not YarnRotaryEmbedding:
        why, fix = (("no compiled kernel for this platform", "rebuild yarn-vllm with its "
                     "extension (pip install --no-build-isolation -e .)") if owner is None else
                    (f"{ROTARY_OP_NAME} is replaced by another plugin's "
                     f"{owner.__module__}.{owner.__qualname__}", "disable that plugin"))
        raise UserError("yarn_mode", f"is {mode!r}, but yarn-vllm's rotary layer is not "
                        f"active ({why})", f"{fix}, or use yarn_mode 'static'")


def configure_scheduler(vllm_config) -> None:
    """After the platform's own config hook (which may turn async scheduling off): the
    per-sequence modes run our scheduler subclass, which keys cached blocks by scale and
    escalates (vllm_seam.scheduler), over the scheduler vLLM would have chosen."""
    from yarn_vllm.vllm_seam.scheduler import scheduler_class

    yarn = served_yarn(vllm_config)
    if yarn is None or yarn.mode == "static":
        return
    mode, scheduler = yarn.mode, vllm_config.scheduler_config
    ours = scheduler_class(bool(scheduler.async_scheduling))
    if scheduler.scheduler_cls not in (None, ours, f"{ours.__module__}.{ours.__qualname__}"):
        raise UserError("scheduler_cls", f"is {scheduler.scheduler_cls!r}; yarn_mode {mode!r} "
                        "needs yarn-vllm's scheduler (it keys cached blocks by scale)",
                        "drop --scheduler-cls, or " + _FIX_STATIC)
    scheduler.scheduler_cls = f"{ours.__module__}.{ours.__qualname__}"


def _configure_dynamic(vllm_config) -> None:
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    if vllm_config.attention_config.backend_per_kind:
        raise UserError("attention_config.backend_per_kind", "routes layers to other "
                        "backends, which would see keys without RoPE",
                        "drop it, or " + _FIX_STATIC)
    attention = vllm_config.attention_config
    if attention.backend not in (None, AttentionBackendEnum.CUSTOM):
        raise UserError("attention_backend", f"is {attention.backend.name}, but yarn_mode "
                        "'dynamic' needs yarn-vllm's pre-RoPE backend",
                        "drop --attention-backend (or use yarn_mode 'static')")
    if AttentionBackendEnum.CUSTOM.get_path() != BACKEND_PATH:
        raise UserError("attention_backend", "CUSTOM is registered by another plugin",
                        "disable that plugin to serve yarn_mode 'dynamic'")
    attention.backend = AttentionBackendEnum.CUSTOM
    scheduler = vllm_config.scheduler_config
    if not scheduler.enable_chunked_prefill:
        _allow_long_steps()
    logger.info("yarn_vllm: Dynamic YaRN: pre-RoPE attention backend; chunked prefill %s, "
                "prefix caching %s (each prompt's chunks run at the scale of the whole prompt; "
                "cached blocks are shared between requests whose prefill ran at one scale)",
                "on" if scheduler.enable_chunked_prefill else "off",
                "on" if vllm_config.cache_config.enable_prefix_caching else "off")


def _allow_long_steps() -> None:
    """Without chunked prefill, let one step run as long as a whole prompt's prefill takes.

    vLLM's executor gives a step VLLM_EXECUTE_MODEL_TIMEOUT_SECONDS (300 s) and then
    kills the engine; a 16k prompt prefilled in one step took longer than that on a
    busy 2-core CPU. Set here, before the engine core starts, so its processes inherit
    it; a value the user set is kept.
    """
    from vllm.platforms import current_platform

    if current_platform.device_type == "cpu":
        os.environ.setdefault("VLLM_EXECUTE_MODEL_TIMEOUT_SECONDS", "7200")
