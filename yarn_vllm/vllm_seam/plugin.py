"""vLLM plugin entry: `vllm.general_plugins` -> `yarn_vllm:register`.

vLLM calls this in every process it starts (API server, engine core, each worker), so it
is idempotent, imports vLLM only when called, and leaves every model without YaRN exactly
as vLLM would serve it. It first checks the vLLM names it relies on (vllm_names); on a
mismatch it hooks nothing but the refusal of YaRN models. Otherwise it hooks:

  * the rotary layer: vLLM's factory hands out yarn_vllm.vllm_seam.rotary.YarnRotaryEmbedding
    for rope_type "yarn" (when the compiled kernels exist for this platform);
  * the platform's config hook: every YaRN config is validated, and each mode's engine
    settings applied, our scheduler included (engine_settings, scheduler);
  * the platform's backend selector: AttentionBackendEnum.CUSTOM answers our pre-RoPE
    backend (dynamic mode; vLLM's CPU platform otherwise always says CPU_ATTN);
  * admission: each request's scale is fixed as it enters the engine (admission), with
    what only the OpenAI server knows (openai_hooks);
  * the model runners: one StepBatch per step (step).
"""

from __future__ import annotations

import logging

logger = logging.getLogger("yarn_vllm")

_STATE: dict = {}  # this process's outcome: {"problems": [...]}, set by the first register()


def register() -> None:
    """Check the vLLM names we rely on, then install the hooks above. Safe to call repeatedly."""
    from yarn_vllm.vllm_seam import vllm_names
    from yarn_vllm.vllm_seam.logs import route_plugin_log_to_vllm

    route_plugin_log_to_vllm()  # our lines then show in vLLM's log, in every process
    if "problems" not in _STATE:
        _STATE["problems"] = vllm_names.problems()
        if _STATE["problems"]:
            logger.warning("yarn_vllm: not active; models without YaRN are served by vLLM as "
                           "usual, YaRN models are refused: %s",
                           vllm_names.refusal(_STATE["problems"]))
    if _STATE["problems"]:
        _refuse_yarn_models(vllm_names.refusal(_STATE["problems"]))
        return
    from yarn_vllm.vllm_seam import openai_hooks, step

    _register_rotary()
    _register_platform_hooks()
    _register_admission()
    step.install()
    openai_hooks.install()


def _refuse_yarn_models(error: Exception) -> None:
    """Refuse YaRN models at config time (raise `error`) through the platform's config hook."""
    from yarn_vllm.vllm_seam.patching import MARK

    def refuse_if_yarn(vllm_config) -> None:
        from yarn_vllm.yarn.hf_config import rope_parameters_of, rope_type_of

        hf_config = getattr(getattr(vllm_config, "model_config", None), "hf_config", None)
        if hf_config is not None and rope_type_of(rope_parameters_of(hf_config)) == "yarn":
            raise error

    try:
        from vllm.platforms import current_platform

        platform = type(current_platform)
        check_config = platform.check_and_update_config
    except (ImportError, AttributeError):
        return  # no door left: the warning above is all we can say
    if getattr(check_config, MARK, False):
        return

    def check_and_update_config(cls, vllm_config) -> None:
        refuse_if_yarn(vllm_config)
        check_config.__func__(cls, vllm_config)

    setattr(check_and_update_config, MARK, True)
    platform.check_and_update_config = classmethod(check_and_update_config)


def _register_platform_hooks() -> None:
    from vllm.platforms import current_platform
    from vllm.v1.attention.backends.registry import AttentionBackendEnum, register_backend

    from yarn_vllm.vllm_seam.engine_settings import BACKEND_PATH, configure, configure_scheduler
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
        configure_scheduler(vllm_config)

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

    from yarn_vllm.vllm_seam.admission import admit
    from yarn_vllm.vllm_seam.patching import run_after

    def admitted(processor, request, *args, **kwargs) -> None:
        # the caller's own params (args[2]): max_tokens None there means open-ended
        params = kwargs.get("params", args[2] if len(args) > 2 else None)
        admit(processor, request, params, resumable=bool(kwargs.get("resumable", False)))

    run_after(InputProcessor, "process_inputs", admitted)


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
