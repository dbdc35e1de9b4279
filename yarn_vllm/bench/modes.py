"""The RoPE modes a throughput benchmark compares, as engine settings.

  vllm-yarn     vLLM's own static YaRN layer (our plugin off: VLLM_PLUGINS="")
  ours-static   our YaRN rotary layer (plugin on)
  ours-dynamic  Dynamic YaRN through the pre-RoPE attention backend ("yarn_mode": "dynamic");
                offered only once yarn_vllm.config.SERVED_MODES includes "dynamic"
  none          RoPE as trained, no scaling (only the length limit lifted when needed)

All modes get the same extension factor and the same length limit, so they differ only in
the RoPE path.
"""

from __future__ import annotations

from dataclasses import dataclass

from yarn_vllm import config as yarn_config
from yarn_vllm.config import YarnConfig

MODES = ("vllm-yarn", "ours-static", "ours-dynamic", "none")
DEFAULT_MODES = MODES


def dynamic_served() -> bool:
    return "dynamic" in yarn_config.SERVED_MODES


def available_modes(modes, log=print) -> list[str]:
    """`modes` in order, minus ours-dynamic (with a printed note) while it is not served."""
    out = []
    for mode in modes:
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}; choose from {', '.join(MODES)}")
        if mode == "ours-dynamic" and not dynamic_served():
            log("note: skipping ours-dynamic: this yarn-vllm does not serve yarn_mode 'dynamic' "
                "yet (yarn_vllm.config.SERVED_MODES); it joins the comparison when it does")
            continue
        out.append(mode)
    return out


@dataclass(frozen=True)
class ModeEngine:
    """What one mode changes: vLLM's hf_overrides and whether our plugin is loaded."""

    hf_overrides: dict
    plugins: bool


def mode_engine(mode: str, hf_config: dict, factor: float, max_len: int) -> ModeEngine:
    """Engine settings for `mode` at extension `factor`, allowing sequences of `max_len` tokens."""
    trained = int(hf_config["max_position_embeddings"])
    if mode == "none":
        return ModeEngine({"max_position_embeddings": max(trained, max_len)}, plugins=True)
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; choose from {', '.join(MODES)}")
    yarn_mode = "dynamic" if mode == "ours-dynamic" else "static"
    overrides = YarnConfig(factor=factor, mode=yarn_mode).hf_overrides(hf_config)
    overrides["max_position_embeddings"] = max(overrides["max_position_embeddings"], max_len)
    return ModeEngine(overrides, plugins=mode != "vllm-yarn")
