"""vLLM plugin entry: `vllm.general_plugins` -> `yarn_vllm:register`.

vLLM calls this in every process it starts (API server, engine core, each
worker), so it is idempotent, imports vLLM only when called, and leaves every
model without YaRN exactly as vLLM would serve it. What it hooks:

  * the rotary layer: vLLM's factory hands out yarn_vllm.vllm_seam.rotary.YarnRotaryEmbedding
    for rope_type "yarn" (when the compiled kernels exist for this platform);
  * the platform's config hook: every YaRN config is validated, and each mode's
    engine settings applied (yarn_vllm.vllm_seam.engine_settings);
  * the platform's backend selector: AttentionBackendEnum.CUSTOM answers our
    pre-RoPE backend (dynamic mode; vLLM's CPU platform otherwise always says CPU_ATTN);
  * admission: each request's scale is fixed as it enters the engine (the
    per-sequence modes; yarn_vllm.vllm_seam.admission). The model-runner side
    (yarn_vllm.vllm_seam.runner_hooks) is installed by the first request- or dynamic-mode
    rotary layer, in the worker that builds it.
"""

from __future__ import annotations

import logging

logger = logging.getLogger("yarn_vllm")


def register() -> None:
    """Install the hooks above. Safe to call repeatedly."""
    from yarn_vllm.vllm_seam.logs import route_plugin_log_to_vllm

    route_plugin_log_to_vllm()  # our lines then show in vLLM's log, in every process
    _register_rotary()
    _register_platform_hooks()
    _register_admission()


def _register_platform_hooks() -> None:
    from vllm.platforms import current_platform
    from vllm.v1.attention.backends.registry import AttentionBackendEnum, register_backend

    from yarn_vllm.vllm_seam.engine_settings import BACKEND_PATH, configure
    from yarn_vllm.vllm_seam.patching import MARK

    if not AttentionBackendEnum.CUSTOM.is_overridden():
        register_backend(AttentionBackendEnum.CUSTOM, BACKEND_PATH)
    platform = type(current_platform)
    if getattr(platform.check_and_update_config, MARK, False):
        return
    check_config = platform.check_and_update_config
    select_backend = platform.get_attn_backend_cls

    def check_and_update_config(cls, vllm_config) -> None:
        configure(vllm_config)
        check_config.__func__(cls, vllm_config)

    def get_attn_backend_cls(cls, selected_backend, *args, **kwargs) -> str:
        if (selected_backend == AttentionBackendEnum.CUSTOM
                and AttentionBackendEnum.CUSTOM.get_path() == BACKEND_PATH):
            return BACKEND_PATH
        return select_backend.__func__(cls, selected_backend, *args, **kwargs)

    setattr(check_and_update_config, MARK, True)
    platform.check_and_update_config = classmethod(check_and_update_config)
    platform.get_attn_backend_cls = classmethod(get_attn_backend_cls)


def _register_admission() -> None:
    from vllm.v1.engine.input_processor import InputProcessor

    from yarn_vllm.vllm_seam.patching import run_after
    from yarn_vllm.vllm_seam.admission import admit

    # vLLM passes `resumable` by keyword; a streamed prompt cannot keep a fixed scale
    run_after(InputProcessor, "process_inputs", lambda processor, request, *a, **k: admit(
        processor, request, resumable=bool(k.get("resumable", False))))


def _register_rotary() -> None:
    import torch
    from vllm.model_executor.custom_op import CustomOp, op_registry_oot
    from vllm.platforms import current_platform

    from yarn_vllm.vllm_seam.engine_settings import ROTARY_OP_NAME
    from yarn_vllm.ops import extension_supports
    from yarn_vllm.vllm_seam.rotary import YarnRotaryEmbedding

    current = op_registry_oot.get(ROTARY_OP_NAME)
    if current is YarnRotaryEmbedding:
        return
    device_type = current_platform.device_type
    if not extension_supports(torch.device(device_type)):
        # Without our kernels for this platform vLLM's own YaRN layer is the better
        # static path than our PyTorch fallback; say so once per process.
        logger.warning("yarn_vllm: no compiled rotary kernel for %r (rebuild with the CUDA "
                       "toolkit, see setup.py); vLLM's own YaRN layer serves", device_type)
        return
    if current is not None:
        # register_oot asserts on duplicates; another plugin owns the name.
        logger.warning("yarn_vllm: %s is already replaced by %s; leaving it", ROTARY_OP_NAME,
                       current.__qualname__)
        return
    CustomOp.register_oot(YarnRotaryEmbedding, name=ROTARY_OP_NAME)
    logger.info("yarn_vllm: serving YaRN RoPE with %s", YarnRotaryEmbedding.__qualname__)
