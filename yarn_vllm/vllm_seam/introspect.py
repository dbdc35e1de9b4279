"""Questions asked of a loaded model, e.g. through `LLM.apply_model` (importable, so picklable)."""

from __future__ import annotations


def rotary_layer_classes(model) -> list[str]:
    """Fully qualified classes of the rotary embedding layers in `model` (an nn.Module)."""
    return sorted({type(m).__module__ + "." + type(m).__qualname__
                   for m in model.modules() if type(m).__name__.endswith("RotaryEmbedding")})


def attention_backend_classes(model) -> list[str]:
    """Fully qualified classes of the attention backends that `model`'s layers run on."""
    return sorted({b.__module__ + "." + b.__qualname__
                   for m in model.modules() if (b := getattr(m, "attn_backend", None)) is not None})
