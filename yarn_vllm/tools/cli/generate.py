"""`yarn-vllm generate`: offline batch generation with YaRN, the main job.

Without prompts it runs the main job (yarn_vllm.tools.tasks.main_job): one batch of a short
prompt inside the trained context and a long one past it, served in request mode, and a
table of each prompt's length, the YaRN scale it was served at and its check. The engine
runs in this process and is stepped by hand, so a long prefill shows its progress
(yarn_vllm.tools.progress). Flags it does not know go to vLLM's `LLM(...)`.
"""

from __future__ import annotations

import json
import os
import time

from yarn_vllm.tools.cli.args import add_model_flag, add_yarn_flags, check_numbers, depths, \
    passthrough_kwargs, yarn_config_from_args, yarn_flags_given
from yarn_vllm.tools.engine_args import engine_setup
from yarn_vllm.tools.engine_worker import ENGINE_IN_PROCESS
from yarn_vllm.errors import UserError
from yarn_vllm.tools.tasks.main_job import (LONG_MAX_TOKENS, job_lengths, job_prompts,
                                            job_reference, job_rows, main_job_yarn)


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


def dtype_reason(user_kwargs: dict, kwargs: dict, dtype: str) -> str:
    """Why the engine runs in `dtype`: the user's flag, our CPU default, or vLLM's auto."""
    from yarn_vllm.tools.cpu import cpu_lacks_bf16, on_cuda

    if "dtype" in user_kwargs:
        return f"{dtype}, as --dtype asked"
    if "dtype" in kwargs:  # yarn_vllm.tools.cpu's default
        return (f"{dtype}, because this CPU has no native bf16 (no AMX or AVX512-BF16) and "
                "emulated bf16 prefill measured about 3x slower than fp32; --dtype overrides")
    if on_cuda() or cpu_lacks_bf16():
        return f"{dtype}, vLLM's choice for this model (dtype auto)"
    return (f"{dtype}, vLLM's choice for this model (dtype auto), kept because this CPU has "
            "native bf16 (AMX or AVX512-BF16); --dtype overrides")


def run(args, unknown) -> int:
    t_command = time.perf_counter()  # before transformers' import (~15 s here under load)
    from transformers import AutoConfig

    from yarn_vllm.tools.models import resolve_model

    check_numbers(args, "generate", positive=("max_tokens", "replicas", "passkey_length",
                                              "replica_timeout"),
                  non_negative=("temperature",))
    if args.static:
        if args.yarn_mode not in (None, "static"):
            raise UserError("--static", f"is given with --yarn-mode {args.yarn_mode}",
                            "give one of them", source="generate")
        args.yarn_mode = "static"
    yarn = yarn_config_from_args(args)
    model = resolve_model(args.model)
    prompts = read_prompts(args)
    hf = AutoConfig.from_pretrained(model).to_dict() if yarn is not None or not prompts else {}
    main_job = not prompts
    if main_job:  # a short and a long prompt in one batch
        trained = args.original_max_position or hf["max_position_embeddings"]
        long_length = job_lengths(trained, args.passkey_length)[1]
        yarn = main_job_yarn(yarn, args, trained, long_length + LONG_MAX_TOKENS)
    user_kwargs = passthrough_kwargs(unknown)
    setup = engine_setup(user_kwargs, hf_config=hf, yarn=yarn, flags=yarn_flags_given(args),
                         source="generate")
    kwargs = setup.kwargs
    if main_job:
        prompts = job_prompts(args, model, trained, yarn, kwargs.get("max_model_len", trained))
    if args.replicas == 1:
        setup.apply_env()  # replicas build their own, each with its share of the cores
        # The engine core in this process: its scheduler's counts feed the progress line,
        # and start-up spawns no engine-core and worker processes that import vLLM again
        # (SmolLM2's engine started in 52-68 s so, 127 s with them, at load average 10-18).
        for key, value in ENGINE_IN_PROCESS.items():
            os.environ.setdefault(key, value)
    reference, ref_dtype = {}, None
    if main_job and args.temperature == 0:  # the as-trained check compares greedy tokens
        reference, ref_dtype = job_reference(model, kwargs, prompts)
    sampling = {"temperature": args.temperature, "max_tokens": args.max_tokens, "seed": 0}
    if args.replicas > 1:  # Ray actors, one engine each; outputs in input order
        from yarn_vllm.tools.replicas import generate_replicated_outputs
        from yarn_vllm.yarn.scale_policy import ScalePolicy

        sampling["max_tokens"] = max(p.get("max_tokens", args.max_tokens) for p in prompts)
        for p in prompts:  # one sampling for all: the scale column must use what was asked
            if "job" in p:
                p["job"].max_tokens = sampling["max_tokens"]
        results, wall = generate_replicated_outputs(model, kwargs, prompts, sampling,
                                                    args.replicas, address=args.address,
                                                    timeout_s=args.replica_timeout)
        dtype = ref_dtype  # the same engine arguments, so the same resolution
        policy = ScalePolicy.from_hf_config({**hf, **kwargs["hf_overrides"]}) if yarn else None
    else:
        results, wall, dtype, policy, used = run_engine(model, kwargs, user_kwargs, prompts,
                                                        sampling)
    rows = None
    if main_job:
        rows = job_rows(prompts, results, policy, reference if dtype == ref_dtype else {},
                        used if args.replicas == 1 else None)
    write_results(args.output, results, wall, rows)
    if rows:
        from yarn_vllm.tools.tasks.main_job import table

        print(table(rows), flush=True)
    print(f"yarn-vllm generate: done in {time.perf_counter() - t_command:.0f} s "
          "(engine start included)", flush=True)
    return 0


def run_engine(model: str, kwargs: dict, user_kwargs: dict, prompts: list[dict],
               sampling: dict):
    """One engine in this process, stepped by hand with a progress line: (outputs, generation
    seconds, dtype, the engine's ScalePolicy or None, the scale each output's last token was
    produced at as the engine's scheduler reports it, None where it does not say)."""
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    from yarn_vllm.tools.engine_worker import engine_dtype
    from yarn_vllm.tools.progress import ProgressLine, in_process_scheduler, run_stepped
    from yarn_vllm.yarn.scale_policy import ScalePolicy

    t0 = time.perf_counter()
    llm = LLM(model=model, **kwargs)
    dtype = engine_dtype(llm)
    print(f"yarn-vllm: engine ready in {time.perf_counter() - t0:.0f} s; dtype "
          f"{dtype_reason(user_kwargs, kwargs, dtype)}", flush=True)
    inputs = [TokensPrompt(prompt_token_ids=p["prompt_token_ids"])
              if "prompt_token_ids" in p else p["prompt"] for p in prompts]
    params = [SamplingParams(**{**sampling, "max_tokens": p.get("max_tokens",
                                                                 sampling["max_tokens"])})
              for p in prompts]
    line = ProgressLine(note_shm=in_process_scheduler(llm) is None)
    t0 = time.perf_counter()
    try:
        results = run_stepped(llm, inputs, params, line)
    finally:
        line.close()
    from yarn_vllm.vllm_seam.scheduler import finished_scale_of

    scheduler = in_process_scheduler(llm)
    used = [finished_scale_of(scheduler, r.request_id) for r in results]
    return (results, time.perf_counter() - t0, dtype,
            ScalePolicy.from_vllm_config(llm.llm_engine.vllm_config), used)


def write_results(path: str, results, wall: float, job_rows: list[dict] | None = None) -> None:
    """One JSON line per prompt (with the main job's row), and a throughput line on stdout."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    n_prompt = n_out = 0
    with open(path, "w") as f:
        for i, r in enumerate(results):
            c = r.outputs[0]
            row = {"index": i, **(job_rows[i] if job_rows else {}),
                   "prompt_tokens": len(r.prompt_token_ids), "output_tokens": len(c.token_ids),
                   "text": c.text, "finish_reason": c.finish_reason}
            row.pop("result", None)
            n_prompt += row["prompt_tokens"]
            n_out += row["output_tokens"]
            f.write(json.dumps(row) + "\n")
    print(f"yarn-vllm generate: {len(results)} prompts, {n_prompt:,} prompt + {n_out} generated "
          f"tokens in {wall:.1f} s ({(n_prompt + n_out) / wall:.0f} tok/s, "
          f"{n_out / wall:.1f} generated tok/s) -> {path}", flush=True)


def add_parser(sub) -> None:
    g = sub.add_parser("generate", help="offline batch generation with YaRN")
    add_model_flag(g)
    g.add_argument("--prompt", action="append", help="a prompt (repeatable)")
    g.add_argument("--prompts-file", help="text file (one prompt a line) or JSONL with 'prompt'")
    g.add_argument("--passkey-length", type=int,
                   help="main job: the long prompt's length (default 1.5x the trained context)")
    g.add_argument("--passkey-depths", type=depths, default=[0.5],
                   help="main job: comma-separated key depths of the long prompts, in [0, 1] "
                        "(default 0.5: one long prompt)")
    g.add_argument("--static", action="store_true",
                   help="main job: static YaRN (every request at s = factor), as --yarn-mode "
                        "static; the default is request mode")
    g.add_argument("--max-tokens", type=int, default=64)
    g.add_argument("--temperature", type=float, default=0.0)
    g.add_argument("--output", default="results/generate.jsonl")
    g.add_argument("--replicas", type=int, default=1,
                   help="spread the batch over N engine replicas in Ray actors (same outputs)")
    g.add_argument("--address", help="--replicas: an existing Ray cluster, e.g. "
                   "127.0.0.1:6379 (default: start a local one)")
    g.add_argument("--replica-timeout", type=float, default=3600,
                   help="--replicas: seconds from submission for every replica to start and "
                        "generate; past it the replicas are stopped and the command fails "
                        "(default 3600)")
    add_yarn_flags(g)
    g.set_defaults(func=run)
