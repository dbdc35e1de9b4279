"""Short requests behind a long prompt: TTFT of 8 short chat-sized prompts that arrive with
one 16k prompt, per YaRN mode, through `yarn-vllm serve` (the OpenAI server), side by side.

This is the case chunked prefill exists for: with it the short prompts can be scheduled
beside the long one's chunks; a one-step prefill makes everything that arrives with the
long prompt wait for that step. vLLM's V1 scheduler serves running requests first, so a
long prompt admitted first takes the whole token budget every step unless
`--long-prefill-token-threshold` caps its share. Each repeat sends fresh random prompts
(no prefix cache hits), all at the same moment, and waits for every answer.

A configuration is NAME=MODE[:vLLM serve flags, space-separated]:

    .venv/bin/python benchmarks/bench_mixed_ttft.py --configs \
        "request=request" "request-cap=request:--long-prefill-token-threshold 512" \
        "dynamic-one-step=dynamic:--no-enable-chunked-prefill --max-num-batched-tokens 32768" \
        "dynamic-cap=dynamic:--long-prefill-token-threshold 512"
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(__file__))
from timing import environment, write_json  # noqa: E402

from yarn_vllm.tools.bench.online import percentile, stream_one  # noqa: E402
from yarn_vllm.tools.models import resolve_model  # noqa: E402
from yarn_vllm.tools.testing.server_process import LocalServer  # noqa: E402


def one_round(url: str, model: str, rng: random.Random, args) -> dict:
    """Send the long prompt and the short ones at once; TTFT and latency of each, seconds."""
    import httpx

    def tokens(n):
        return [rng.randrange(100, args.vocab_size) for _ in range(n)]

    jobs = [("long", tokens(args.long_tokens), args.output_tokens)]
    jobs += [(f"short{i}", tokens(args.short_tokens), args.output_tokens)
             for i in range(args.num_short)]
    results: dict[str, dict] = {}
    start = threading.Barrier(len(jobs))

    def run(name, prompt, out_tokens):
        with httpx.Client(timeout=None) as client:
            start.wait()
            results[name] = stream_one(client, url, model, prompt, out_tokens)

    threads = [threading.Thread(target=run, args=job) for job in jobs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    short = [results[f"short{i}"]["ttft_s"] for i in range(args.num_short)]
    return {"short_ttft_s": short, "long_ttft_s": results["long"]["ttft_s"],
            "short_ttft_p50_s": percentile(short, 50), "short_ttft_p99_s": percentile(short, 99),
            "long_latency_s": results["long"]["latency_s"]}


def parse_config(text: str) -> tuple[str, str, list[str]]:
    """'request-cap=request:--long-prefill-token-threshold 512' -> (name, mode, flags)."""
    name, _, rest = text.partition("=")
    mode, _, flags = (rest or name).partition(":")
    return name, mode, flags.split()


def bench_mode(config: str, args) -> dict:
    name, mode, flags = parse_config(config)
    model = resolve_model(args.model)
    serve_args = ["--factor", str(args.factor), "--yarn-mode", mode, *flags, *args.vllm_args]
    log = os.path.join(args.log_dir, f"serve_{name}.log")
    print(f"[{name}] starting yarn-vllm serve {' '.join(serve_args)} (log: {log})", flush=True)
    t0 = time.perf_counter()
    with LocalServer(model, serve_args, log_path=log) as server:
        started = time.perf_counter() - t0
        import httpx

        with httpx.Client(timeout=None) as client:  # warm-up: first-call costs
            served = client.get(server.url + "/v1/models").json()["data"][0]["id"]
            stream_one(client, server.url, served, [101, 102, 103], 2)
        rounds = []
        for r in range(args.repeats):
            row = one_round(server.url, served, random.Random(1000 * r + 7), args)
            rounds.append(row)
            print(f"[{name}] round {r + 1}: short TTFT p50 {row['short_ttft_p50_s']:.2f} s, "
                  f"p99 {row['short_ttft_p99_s']:.2f} s; long TTFT {row['long_ttft_s']:.2f} s",
                  flush=True)
    p50 = sorted(x["short_ttft_p50_s"] for x in rounds)
    p99 = sorted(x["short_ttft_p99_s"] for x in rounds)
    return {"config": name, "mode": mode, "serve_args": serve_args, "server_start_s": started, "rounds": rounds,
            "short_ttft_p50_s_median": p50[len(p50) // 2], "short_ttft_p50_s_range": [p50[0], p50[-1]],
            "short_ttft_p99_s_median": p99[len(p99) // 2], "short_ttft_p99_s_range": [p99[0], p99[-1]]}


# The workload's numbers: YaRN factor, prompt sizes, requests, and repeats of the whole round.
SIZES = {"factor": 4.0, "long_tokens": 16384, "short_tokens": 256, "num_short": 8,
         "output_tokens": 16, "vocab_size": 49152, "repeats": 2}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--configs", nargs="+", default=["request", "dynamic"],
                   help="NAME=MODE[:serve flags] each (see above); a bare MODE names itself")
    for name, default in SIZES.items():  # --factor 4.0, --long-tokens 16384, ...
        p.add_argument("--" + name.replace("_", "-"), type=type(default), default=default)
    p.add_argument("--log-dir", default="bench_results")
    p.add_argument("--out", default="bench_results/mixed_ttft.json")
    args, vllm_args = p.parse_known_args(argv)
    args.vllm_args = vllm_args  # e.g. --dtype float32, passed to every server
    os.makedirs(args.log_dir, exist_ok=True)
    rows = [bench_mode(config, args) for config in args.configs]
    print(f"{'config':>18} {'short TTFT p50 (s)':>20} {'short TTFT p99 (s)':>20}")
    for row in rows:
        print(f"{row['config']:>18} {row['short_ttft_p50_s_median']:>11.2f} "
              f"({row['short_ttft_p50_s_range'][0]:.2f}-{row['short_ttft_p50_s_range'][1]:.2f}) "
              f"{row['short_ttft_p99_s_median']:>11.2f} "
              f"({row['short_ttft_p99_s_range'][0]:.2f}-{row['short_ttft_p99_s_range'][1]:.2f})")
    for row in rows[1:]:
        for key in ("short_ttft_p50_s_median", "short_ttft_p99_s_median"):
            print(f"{row['config']} / {rows[0]['config']} {key.split('_s_')[0]}: "
                  f"{row[key] / rows[0][key]:.3f}")
    write_json(args.out, {"env": environment(), "args": {k: v for k, v in vars(args).items()},
                          "modes": rows})


if __name__ == "__main__":
    main()
