"""The one way yarn-vllm hooks a vLLM method: run our code after it, idempotently."""

from __future__ import annotations

MARK = "_yarn_vllm"  # set on every function we install, so a second register() skips it


def run_after(cls, name: str, after) -> None:
    """Make `cls.name` call `after(self, result, *args, **kwargs)` once it returns.

    The original's result passes through unchanged; a method already wrapped is left alone
    (vLLM loads plugins in every process, sometimes more than once).
    """
    original = getattr(cls, name)
    if getattr(original, MARK, False):
        return

    def wrapper(self, *args, **kwargs):
        result = original(self, *args, **kwargs)
        after(self, result, *args, **kwargs)
        return result

    setattr(wrapper, MARK, True)
    wrapper.__wrapped__ = original
    wrapper.__name__ = name
    setattr(cls, name, wrapper)
