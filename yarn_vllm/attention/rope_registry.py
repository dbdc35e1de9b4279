"""The model's Dynamic-YaRN RoPE, handed from the rotary layers to the attention backend.

Both live in the same worker process; the rotary layers are built with the
model, before the first attention step, so the backend reads it lazily.
"""

from __future__ import annotations

from yarn_vllm.attention.rope_spec import DynamicRope

_current: DynamicRope | None = None
_owner: int | None = None


def publish(rope: DynamicRope, owner: int) -> None:
    """Called by every dynamic rotary layer of the model `owner` (id of its vLLM config).

    All layers of one model must agree; a new model in the same process replaces it.
    """
    global _current, _owner
    if owner != _owner:
        _current, _owner = None, owner
    if _current is not None and _current != rope:
        raise ValueError(f"yarn_vllm: rotary layers disagree in dynamic mode ({_current} vs "
                         f"{rope}). Fix: serve this model with yarn_mode 'static'.")
    _current = rope


def current() -> DynamicRope:
    if _current is None:
        raise RuntimeError("yarn_vllm: the dynamic attention backend is active but the model "
                           "built no yarn_vllm rotary layer in dynamic mode (its RoPE is not "
                           "YaRN, or the plugin is disabled). Fix: rope_parameters rope_type "
                           "'yarn' with yarn_mode 'dynamic' and the plugin enabled, or "
                           "yarn_mode 'static'.")
    return _current
