"""vLLM plugin entry: `vllm.general_plugins` -> `yarn_vllm:register`.

vLLM calls this in every process it starts (API server, engine core, each
worker), so it is idempotent and imports vLLM only when called.
"""

from __future__ import annotations

import logging

logger = logging.getLogger("yarn_vllm")

ROTARY_OP_NAME = "YaRNScalingRotaryEmbedding"


def register() -> None:
    """Swap vLLM's YaRN rotary layer for ours and hook dynamic mode. Safe to call repeatedly."""
    from yarn_vllm.logs import route_plugin_log_to_vllm

    route_plugin_log_to_vllm()  # our lines then show in vLLM's log, in every process
    _register_rotary()
    _register_dynamic_backend()


def _register_dynamic_backend() -> None:
    """Make `yarn_mode: dynamic` select our pre-RoPE attention backend.

    The backend takes AttentionBackendEnum.CUSTOM. The platform's config hook is
    wrapped to switch a dynamic model to it (see attention/engine_config.py), and
    its backend selector to honour CUSTOM: vLLM's CPU platform otherwise always
    answers CPU_ATTN. Both wrappers pass everything else through untouched.
    """
    from vllm.platforms import current_platform
    from vllm.v1.attention.backends.registry import AttentionBackendEnum, register_backend

    from yarn_vllm.attention.engine_config import BACKEND_PATH, configure_dynamic

    if not AttentionBackendEnum.CUSTOM.is_overridden():
        register_backend(AttentionBackendEnum.CUSTOM, BACKEND_PATH)
    platform = type(current_platform)
    if getattr(platform.check_and_update_config, "_yarn_vllm", False):
        return
    check_config = platform.check_and_update_config
    select_backend = platform.get_attn_backend_cls

    def check_and_update_config(cls, vllm_config) -> None:
        configure_dynamic(vllm_config)
        check_config.__func__(cls, vllm_config)

    def get_attn_backend_cls(cls, selected_backend, *args, **kwargs) -> str:
        if (selected_backend == AttentionBackendEnum.CUSTOM
                and AttentionBackendEnum.CUSTOM.get_path() == BACKEND_PATH):
            return BACKEND_PATH
        return select_backend.__func__(cls, selected_backend, *args, **kwargs)

    check_and_update_config._yarn_vllm = True
    platform.check_and_update_config = classmethod(check_and_update_config)
    platform.get_attn_backend_cls = classmethod(get_attn_backend_cls)


def _register_rotary() -> None:
    import torch
    from vllm.model_executor.custom_op import CustomOp, op_registry_oot
    from vllm.platforms import current_platform

    from yarn_vllm.ops import extension_supports
    from yarn_vllm.rotary import YarnRotaryEmbedding

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
