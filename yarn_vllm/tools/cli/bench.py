"""`yarn-vllm bench`: throughput per RoPE method, offline (the default), online and sweeps."""

from __future__ import annotations

import time

from yarn_vllm.tools.cli.args import FACTOR_HELP, add_model_flag, check_factor, check_numbers, \
    method_names, passthrough_kwargs, positive_ints
from yarn_vllm.errors import UserError
from yarn_vllm.tools.engine_args import engine_setup

BENCH_COMMANDS = ("offline", "online", "sweep")


def _no_extra(command: str, unknown: list[str]) -> None:
    if unknown:
        raise UserError(" ".join(unknown), "is not an argument of this command",
                        f"see yarn-vllm bench {command} --help", source=f"bench {command}")


def cmd_offline(args, unknown) -> int:
    from yarn_vllm.tools.bench.offline import run_offline
    from yarn_vllm.tools.bench.report import output_paths, write_offline
    from yarn_vllm.tools.models import resolve_model

    # before any engine: a bad value must not cost a benchmark's worth of waiting
    check_factor(args.factor, "bench offline")
    check_numbers(args, "bench offline", positive=("output_tokens", "repeats", "timeout"))
    output_paths(args.out, args.name, source="bench offline")
    llm_kwargs = passthrough_kwargs(unknown)
    engine_setup(llm_kwargs, source="bench offline")  # e.g. more TP ranks than cores, refused now
    t0 = time.perf_counter()
    results = run_offline(resolve_model(args.model), args.methods, args.context_lengths,
                          args.batch_sizes, output_tokens=args.output_tokens, factor=args.factor,
                          repeats=args.repeats, llm_kwargs=llm_kwargs, timeout=args.timeout)
    results["wall_s"] = time.perf_counter() - t0
    write_offline(results, args.out, args.name)
    print(f"yarn-vllm bench offline: {results['wall_s']:.0f} s")
    return 0


def cmd_online(args, unknown) -> int:
    from yarn_vllm.tools.bench.online import run_online, write_online
    from yarn_vllm.tools.bench.report import output_paths

    _no_extra("online", unknown)
    check_numbers(args, "bench online",
                  positive=("num_requests", "concurrency", "output_tokens", "vocab_size"))
    output_paths(args.out, args.name, source="bench online")
    results = run_online(args.url, args.context_lengths, num_requests=args.num_requests,
                         concurrency=args.concurrency, output_tokens=args.output_tokens,
                         model=args.served_model, vocab_size=args.vocab_size,
                         api_key=args.api_key)
    write_online(results, args.out, args.name)
    return 0


def cmd_sweep(args, unknown) -> int:
    from yarn_vllm.tools.bench.sweep import run_sweep, write_summary
    from yarn_vllm.tools.bench.sweep_config import load_sweep
    from yarn_vllm.tools.ray_actors import connect

    _no_extra("sweep", unknown)
    check_numbers(args, "bench sweep", positive=("num_cpus",))
    sweep = load_sweep(args.sweep_file)
    s, configs = sweep["settings"], sweep["configs"]
    output = args.output or s["output"]
    connect(args.address, args.num_cpus)
    report = run_sweep(configs, output, num_cpus=s["num_cpus"], timeout_s=s["timeout_s"],
                       retries=s["retries"], resources=s["resources"])
    write_summary(output)
    return 1 if report["failed"] else 0


def default_to_offline(argv: list[str]) -> list[str]:
    """`bench --context-lengths ...` -> `bench offline --context-lengths ...`."""
    if argv[:1] == ["bench"] and (len(argv) == 1 or argv[1] not in
                                  (*BENCH_COMMANDS, "-h", "--help")):
        return ["bench", "offline", *argv[1:]]
    return argv


def add_parser(sub) -> None:
    """Register `bench` (offline, online, sweep) on the top-level subparsers."""
    from yarn_vllm.tools.bench.offline import DEFAULT_BATCHES, DEFAULT_CONTEXTS
    from yarn_vllm.tools.methods import METHODS, bench_methods

    b = sub.add_parser("bench", help="throughput: offline per RoPE method (the default), "
                       "online TTFT/TPOT, Ray sweeps")
    bsub = b.add_subparsers(dest="bench_command", required=True)

    o = bsub.add_parser("offline", help="prefill/decode/end-to-end tokens/s per method, each "
                        "method's engine in its own process; flags it does not know go to vLLM")
    add_model_flag(o)
    o.add_argument("--methods", type=method_names, default=bench_methods(),
                   help=f"comma-separated, compared side by side, of {', '.join(METHODS)} "
                        f"(default: {','.join(bench_methods())})")
    o.add_argument("--context-lengths", type=positive_ints, default=list(DEFAULT_CONTEXTS),
                   help="prompt lengths in tokens (default 1024,2048; CPU handles up to 32k)")
    o.add_argument("--batch-sizes", type=positive_ints, default=list(DEFAULT_BATCHES))
    o.add_argument("--output-tokens", type=int, default=32)
    o.add_argument("--factor", type=float, help="YaRN factor for every method; " + FACTOR_HELP)
    o.add_argument("--repeats", type=int, default=1, help="batches per case; the median is kept")
    o.add_argument("--timeout", type=float, help="seconds per method's engine")
    o.add_argument("--out", default="bench_results")
    o.add_argument("--name", default="offline", help="output file stem")
    o.set_defaults(func=cmd_offline)

    n = bsub.add_parser("online", help="TTFT/TPOT p50/p90/p99 against a running server")
    n.add_argument("url", help="the server, e.g. http://127.0.0.1:8000")
    n.add_argument("--context-lengths", type=positive_ints, default=[1024])
    n.add_argument("--num-requests", type=int, default=8, help="per context length")
    n.add_argument("--concurrency", type=int, default=4)
    n.add_argument("--output-tokens", type=int, default=32)
    n.add_argument("--served-model", help="model name (default: the server's first)")
    n.add_argument("--api-key", help="the server's API key (default: OPENAI_API_KEY, else "
                   "VLLM_API_KEY from the environment, which keeps it out of `ps`)")
    n.add_argument("--vocab-size", type=int,
                   help="range for random prompt tokens (default: read from the model)")
    n.add_argument("--out", default="bench_results")
    n.add_argument("--name", default="online")
    n.set_defaults(func=cmd_online)

    w = bsub.add_parser("sweep", help="a grid of engine configurations as Ray work (resumable)")
    w.add_argument("sweep_file", help="YAML; see examples/sweep.yaml")
    w.add_argument("--output", help="JSONL results (default: the file's `output`)")
    w.add_argument("--address", help="an existing Ray cluster (default: start a local one)")
    w.add_argument("--num-cpus", type=int, help="CPUs of the local Ray cluster (default: all)")
    w.set_defaults(func=cmd_sweep)
