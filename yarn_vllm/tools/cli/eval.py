"""`yarn-vllm eval`: long-context quality per RoPE method (perplexity, passkey, the suite).

Flags it does not know go to every method's vLLM engine.
"""

from __future__ import annotations

import time

from yarn_vllm.tools.cli.args import FACTOR_HELP, add_model_flag, check_factor, check_numbers, depths, \
    method_names, passthrough_kwargs, positive_ints
from yarn_vllm.tools.engine_args import engine_setup
from yarn_vllm.errors import UserError


def check_flags(args) -> None:
    """Numbers that parse but make no sense, refused before any model loads."""
    source = f"eval {args.eval_command}"
    if args.eval_command == "suite":
        return
    check_factor(args.factor, source)
    if args.eval_command == "passkey":
        check_numbers(args, source, positive=("trials",))
        return
    check_numbers(args, source, positive=("stride",), non_negative=("max_windows",))
    shortest = min(args.windows)
    if shortest < 2:
        raise UserError("--windows", f"holds {shortest}", "give windows of 2 tokens or more "
                        "(a window scores each token after its first)", source=source)
    if args.stride is not None and args.stride > shortest:
        raise UserError("--stride", f"is {args.stride}, longer than the window {shortest}, "
                        "so tokens between windows would never be scored",
                        f"give a stride of at most {shortest}", source=source)


def run(args, unknown) -> int:
    from yarn_vllm.tools.eval import report, run as evaluate
    from yarn_vllm.tools.models import resolve_model

    check_flags(args)
    model = resolve_model(args.model)
    # checked here, before any model loads (e.g. more TP ranks than cores); each method's
    # engine process gets the same setup again with its environment (engine_worker)
    llm_kwargs = engine_setup(passthrough_kwargs(unknown), source=f"eval {args.eval_command}"
                              ).kwargs
    if args.eval_command == "suite":
        return run_suite(args, model, llm_kwargs)
    t0 = time.perf_counter()
    if args.eval_command == "ppl":
        text = open(args.text, encoding="utf-8", errors="replace").read() if args.text else None
        results = evaluate.eval_perplexity(model, args.methods, args.windows, stride=args.stride,
                                           max_windows=args.max_windows, text=text,
                                           factor=args.factor, llm_kwargs=llm_kwargs)
        name = "perplexity"
    else:
        results = evaluate.eval_passkey(model, args.methods, args.lengths, args.depths,
                                        args.trials, factor=args.factor, llm_kwargs=llm_kwargs)
        name = "passkey"
    results["wall_seconds"] = time.perf_counter() - t0
    report.write_outputs(results, args.out, name)
    print(f"yarn-vllm eval {args.eval_command}: {results['wall_seconds']:.0f} s")
    return 0


def run_suite(args, model: str, llm_kwargs: dict) -> int:
    from yarn_vllm.tools.eval import suite

    jobs = suite.SUITE
    if args.jobs:
        names = args.jobs.split(",")
        unknown = sorted(set(names) - {j.name for j in jobs})
        if unknown:
            raise UserError("--jobs", f"names unknown job(s) {', '.join(unknown)}",
                            f"choose from {', '.join(j.name for j in jobs)}",
                            source="eval suite")
        jobs = tuple(j for j in jobs if j.name in names)
    if args.report_only:
        print(suite.report(args.store, readme=args.readme, methods=args.methods))
    else:
        print(suite.run_suite(model, store=args.store, readme=args.readme, methods=args.methods,
                              jobs=jobs, report_jobs=suite.SUITE, force=args.force,
                              llm_kwargs=llm_kwargs))
    return 0


def add_parser(sub) -> None:
    from yarn_vllm.tools.methods import METHODS, eval_methods

    e = sub.add_parser("eval", help="long-context quality: perplexity or passkey, per method")
    esub = e.add_subparsers(dest="eval_command", required=True)
    for name, helptext in [("ppl", "perplexity against context length"),
                           ("passkey", "passkey retrieval over lengths x depths x trials"),
                           ("suite", "every evaluation of the README's results section, "
                                     "resumable")]:
        c = esub.add_parser(name, help=helptext)
        add_model_flag(c)
        c.add_argument("--methods", type=method_names, default=eval_methods(),
                       help=f"comma-separated, of {', '.join(METHODS)} "
                            f"(default: {','.join(eval_methods())})")
        c.set_defaults(func=run)
        if name == "suite":
            c.add_argument("--store", default="docs/eval",
                           help="one JSON per job and method; stored results are reused")
            c.add_argument("--readme",
                           help="also rewrite this file's results section (between markers); "
                                "without it no README is touched")
            c.add_argument("--jobs", help="comma-separated job names (default: all)")
            c.add_argument("--force", action="store_true", help="re-measure stored results")
            c.add_argument("--report-only", action="store_true",
                           help="render the section from the store without running anything")
            continue
        c.add_argument("--factor", type=float, help=FACTOR_HELP)
        c.add_argument("--out", default="results/eval")
        if name == "ppl":
            c.add_argument("--windows", type=positive_ints, default=[2048, 8192, 16384, 32768])
            c.add_argument("--stride", type=int, help="window stride (default: the window)")
            c.add_argument("--max-windows", type=int, default=1,
                           help="windows per size (0 = all the text allows)")
            c.add_argument("--text", help="a UTF-8 text file (default: shipped lcet10.txt)")
        else:
            c.add_argument("--lengths", type=positive_ints, default=[8192, 16384])
            c.add_argument("--depths", type=depths, default=[0.1, 0.5, 0.9])
            c.add_argument("--trials", type=int, default=2)
