"""Questions tools and tests ask of a running vLLM: a loaded model's layers (through
`LLM.apply_model`, so importable and picklable), an in-process engine core's scheduler,
and prompts rendered as LLM.generate renders them."""

from __future__ import annotations


def rotary_layer_classes(model) -> list[str]:
    """Fully qualified classes of the rotary embedding layers in `model` (an nn.Module)."""
    return sorted({type(m).__module__ + "." + type(m).__qualname__
                   for m in model.modules() if type(m).__name__.endswith("RotaryEmbedding")})


def attention_backend_classes(model) -> list[str]:
    """Fully qualified classes of the attention backends that `model`'s layers run on."""
    return sorted({b.__module__ + "." + b.__qualname__
                   for m in model.modules() if (b := getattr(m, "attn_backend", None)) is not None})


def engine_scheduler(llm):
    """vLLM's scheduler when `llm`'s engine core runs in this process
    (VLLM_ENABLE_V1_MULTIPROCESSING=0), else None."""
    core = getattr(llm.llm_engine.engine_core, "engine_core", None)  # InprocClient only
    return None if core is None else core.scheduler


def render_prompts(llm, prompts: list) -> list:
    """`prompts` as LLM.generate hands them to the engine (vLLM's own rendering): token ids
    under "prompt_token_ids"."""
    return list(llm._preprocess_cmpl(prompts)) if prompts else []
