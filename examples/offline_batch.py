"""Offline batch generation with YaRN through plain vLLM (the plugin loads by itself).

  .venv/bin/python examples/offline_batch.py [MODEL_DIR]

Without an argument it uses the default model (converted once by `yarn-vllm prepare`).
"""

import sys

if __name__ == "__main__":  # vLLM's engine starts with multiprocessing spawn
    from transformers import AutoConfig
    from vllm import LLM, SamplingParams

    from yarn_vllm.yarn.config import YarnConfig
    from yarn_vllm.tools.cpu import apply_cpu_defaults
    from yarn_vllm.tools.models import resolve_model

    model = resolve_model(sys.argv[1] if len(sys.argv) > 1 else None)
    overrides = YarnConfig(factor=2.0).hf_overrides(AutoConfig.from_pretrained(model).to_dict())
    kwargs = {"hf_overrides": overrides, "max_model_len": overrides["max_position_embeddings"]}
    apply_cpu_defaults(kwargs)  # CPU-friendly defaults; a no-op on GPU machines
    llm = LLM(model=model, **kwargs)
    prompts = ["Write one sentence about long documents:",
               "The three most useful properties of rotary position embeddings are"]
    for out in llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=48)):
        print(repr(out.prompt), "->", repr(out.outputs[0].text))
