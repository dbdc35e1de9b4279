"""`yarn-vllm generate`: offline batch generation with YaRN, the main job.

Without prompts it runs a built-in passkey task at twice the model's trained context.
Flags it does not know go to vLLM's `LLM(...)`.
"""

from __future__ import annotations

import json
import os
import time

from yarn_vllm.cli.args import add_model_flag, add_yarn_flags, check_numbers, depths, \
    passthrough_kwargs, yarn_config_from_args, yarn_flags_given
from yarn_vllm.cli.overrides import yarn_hf_overrides
from yarn_vllm.config import YarnConfig
from yarn_vllm.cpu import apply_cpu_defaults
from yarn_vllm.errors import UserError


def engine_kwargs(hf_config: dict, yarn: YarnConfig | None, extra: dict,
                  flags: dict | None = None) -> dict:
    """LLM(...) keyword arguments: YaRN's hf_overrides merged with the user's, CPU defaults."""
    kwargs = dict(extra)
    if yarn is not None:
        overrides = yarn_hf_overrides(hf_config, yarn, kwargs.pop("hf_overrides", None), flags)
        kwargs["hf_overrides"] = overrides
        kwargs.setdefault("max_model_len", overrides["max_position_embeddings"])
    apply_cpu_defaults(kwargs)
    return kwargs


def read_prompts(args) -> list[dict]:
    prompts = [{"prompt": p} for p in args.prompt or []]
    if args.prompts_file:
        with open(args.prompts_file) as f:
            if args.prompts_file.endswith(".jsonl"):
                for n, line in enumerate(f, 1):
                    if line.strip():
                        row = json.loads(line)
                        if "prompt" not in row:
                            raise UserError("prompt", f"is missing on line {n}",
                                            "give each line a \"prompt\" field",
                                            source=args.prompts_file)
                        prompts.append(row)
            else:
                prompts += [{"prompt": line.rstrip("\n")} for line in f if line.strip()]
    return prompts


def builtin_passkey_length(trained: int, max_model_len: int, max_tokens: int) -> int:
    """2x the trained context, less the answer's room where the engine's limit is only 2x: a
    16k prompt at factor 2 would fill max_model_len, and vLLM refuses a prompt with no room."""
    return min(2 * trained, max_model_len - max_tokens)


def run(args, unknown) -> int:
    from transformers import AutoConfig

    from yarn_vllm.methods import default_factor
    from yarn_vllm.models import resolve_model

    check_numbers(args, "generate", positive=("max_tokens", "replicas", "passkey_length"),
                  non_negative=("temperature",))
    yarn = yarn_config_from_args(args)
    model = resolve_model(args.model)
    prompts = read_prompts(args)
    hf = AutoConfig.from_pretrained(model).to_dict() if yarn is not None or not prompts else {}
    trained = hf.get("max_position_embeddings")
    task = None
    if not prompts:  # the built-in task: a passkey at 2x the trained context
        args.max_tokens = min(args.max_tokens, 8)
        if yarn is None and not args.no_yarn:
            longest = (args.passkey_length or 2 * trained) + args.max_tokens
            yarn = YarnConfig(factor=default_factor(trained, longest))
    kwargs = engine_kwargs(hf, yarn, passthrough_kwargs(unknown), yarn_flags_given(args))
    if not prompts:
        from transformers import AutoTokenizer

        from yarn_vllm.tasks.passkey import make_passkey_prompt

        tok = AutoTokenizer.from_pretrained(model)
        # the engine's own limit: YaRN's extended length, or the user's --max-model-len
        length = args.passkey_length or builtin_passkey_length(
            trained, kwargs.get("max_model_len", trained), args.max_tokens)
        task = [make_passkey_prompt(tok, length, d, seed=i)
                for i, d in enumerate(args.passkey_depths)]
        prompts = [{"prompt_token_ids": t.token_ids, "key": t.key, "depth": t.depth} for t in task]
        print(f"yarn-vllm: passkey task, {len(task)} prompts of {length} tokens "
              f"(the model was trained to {trained}), YaRN "
              f"{yarn.factor or yarn.target_context if yarn else 'off'}")

    sampling = {"temperature": args.temperature, "max_tokens": args.max_tokens, "seed": 0}
    if args.replicas > 1:  # Ray actors, one engine each; outputs in input order
        from yarn_vllm.replicas import generate_replicated_outputs

        results, wall = generate_replicated_outputs(model, kwargs, prompts, sampling,
                                                    args.replicas)
    else:
        from vllm import LLM, SamplingParams
        from vllm.inputs import TokensPrompt

        llm = LLM(model=model, **kwargs)
        inputs = [TokensPrompt(prompt_token_ids=p["prompt_token_ids"])
                  if "prompt_token_ids" in p else p["prompt"] for p in prompts]
        t0 = time.perf_counter()
        results = llm.generate(inputs, SamplingParams(**sampling), use_tqdm=True)
        wall = time.perf_counter() - t0
    write_results(args.output, prompts, results, task, wall)
    return 0


def write_results(path: str, prompts: list[dict], results, task, wall: float) -> None:
    """One JSON line per prompt, and a summary (with the passkey score) on stdout."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    n_prompt = n_out = found = 0
    with open(path, "w") as f:
        for i, (p, r) in enumerate(zip(prompts, results)):
            c = r.outputs[0]
            row = {"index": i, "prompt_tokens": len(r.prompt_token_ids),
                   "output_tokens": len(c.token_ids), "text": c.text,
                   "finish_reason": c.finish_reason}
            if task:
                row.update(key=p["key"], depth=p["depth"], found=task[i].is_found(c.text))
                found += row["found"]
                print(f"  depth {p['depth']:.2f}: key {p['key']} -> {c.text.strip()[:40]!r} "
                      f"{'FOUND' if row['found'] else 'missed'}")
            n_prompt += row["prompt_tokens"]
            n_out += row["output_tokens"]
            f.write(json.dumps(row) + "\n")
    print(f"yarn-vllm generate: {len(results)} prompts, {n_prompt} prompt + {n_out} generated "
          f"tokens in {wall:.1f} s ({(n_prompt + n_out) / wall:.0f} tok/s, "
          f"{n_out / wall:.1f} generated tok/s) -> {path}")
    if task:
        print(f"passkey found in {found} of {len(task)} prompts")


def add_parser(sub) -> None:
    g = sub.add_parser("generate", help="offline batch generation with YaRN")
    add_model_flag(g)
    g.add_argument("--prompt", action="append", help="a prompt (repeatable)")
    g.add_argument("--prompts-file", help="text file (one prompt a line) or JSONL with 'prompt'")
    g.add_argument("--passkey-length", type=int,
                   help="built-in task's prompt length (default 2x the trained context)")
    g.add_argument("--passkey-depths", type=depths,
                   default=[0.5], help="comma-separated needle depths in [0, 1] (default 0.5)")
    g.add_argument("--max-tokens", type=int, default=64)
    g.add_argument("--temperature", type=float, default=0.0)
    g.add_argument("--output", default="results/generate.jsonl")
    g.add_argument("--replicas", type=int, default=1,
                   help="spread the batch over N engine replicas in Ray actors (same outputs)")
    add_yarn_flags(g)
    g.set_defaults(func=run)
