"""Run one vLLM engine in a fresh process and dump what it produced as JSON.

Tests start it with subprocess so that each engine gets its own environment
(VLLM_PLUGINS on or off) and its own plugin registry:

  python tests/engine_runner.py SPEC.json OUT.json

SPEC: {"model", "dtype", "hf_overrides", "max_model_len", "prompts": [[ids]],
       "max_tokens", "logprobs", "prompt_logprobs", "llm_kwargs"}
OUT:  {"rotary_classes", "outputs": [{"token_ids", "logprobs", "prompt_logprobs"}]}
"""

import json
import sys
import time


def main(spec_path: str, out_path: str) -> None:
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    spec = json.load(open(spec_path))
    llm = LLM(model=spec["model"], dtype=spec.get("dtype", "float32"),
              hf_overrides=spec.get("hf_overrides"), max_model_len=spec["max_model_len"],
              skip_tokenizer_init=True, enforce_eager=True, gpu_memory_utilization=0.3,
              seed=0, **spec.get("llm_kwargs", {}))
    params = SamplingParams(temperature=0.0, max_tokens=spec["max_tokens"],
                            logprobs=spec.get("logprobs"),
                            prompt_logprobs=spec.get("prompt_logprobs"), ignore_eos=True,
                            detokenize=False)
    prompts = [TokensPrompt(prompt_token_ids=ids) for ids in spec["prompts"]]
    t0 = time.perf_counter()
    results = llm.generate(prompts, params, use_tqdm=False)
    print(f"generate took {time.perf_counter() - t0:.1f} s", file=sys.stderr)

    from yarn_vllm.introspect import rotary_layer_classes

    out = {"rotary_classes": llm.apply_model(rotary_layer_classes)[0], "outputs": []}
    for r in results:
        c = r.outputs[0]
        out["outputs"].append({
            "token_ids": list(c.token_ids),
            # per generated step: {token_id: logprob}
            "logprobs": [{str(t): lp.logprob for t, lp in step.items()}
                         for step in (c.logprobs or [])],
            # per prompt position (the first is None): {token_id: logprob}
            "prompt_logprobs": [None if step is None else
                                {str(t): lp.logprob for t, lp in step.items()}
                                for step in (r.prompt_logprobs or [])],
        })
    json.dump(out, open(out_path, "w"))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
