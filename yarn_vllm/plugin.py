"""vLLM plugin entry: `vllm.general_plugins` -> `yarn_vllm:register`.

vLLM calls this in every process it starts (API server, engine core, each
worker), so it is idempotent and imports vLLM only when called.
"""

from __future__ import annotations

import logging

logger = logging.getLogger("yarn_vllm")

ROTARY_OP_NAME = "YaRNScalingRotaryEmbedding"


def register() -> None:
    """Swap vLLM's YaRN rotary layer for ours. Safe to call any number of times."""
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
