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
    from vllm.model_executor.custom_op import CustomOp, op_registry_oot

    from yarn_vllm.rotary import YarnRotaryEmbedding

    current = op_registry_oot.get(ROTARY_OP_NAME)
    if current is YarnRotaryEmbedding:
        return
    if current is not None:
        # register_oot asserts on duplicates; another plugin owns the name.
        logger.warning("yarn_vllm: %s is already replaced by %s; leaving it", ROTARY_OP_NAME,
                       current.__qualname__)
        return
    CustomOp.register_oot(YarnRotaryEmbedding, name=ROTARY_OP_NAME)
    logger.info("yarn_vllm: serving YaRN RoPE with %s", YarnRotaryEmbedding.__qualname__)
