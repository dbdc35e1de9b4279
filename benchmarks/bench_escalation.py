"""What escalation costs: one open-ended chat request that grows from 0.9 L to 3 L tokens,
with short open-ended chat requests arriving as it crosses L and 2 L, through `yarn-vllm
serve` in request mode against static YaRN at `factor`, side by side.

Request mode (its reserve scaled with L: 32 tokens at L = 512, as 512 is at SmolLM2's
8,192) admits the long request at s = 1 and escalates it twice (to 2 at L + 1, to 3
at 2 L + 1), recomputing everything so far each time; static YaRN runs it at s = factor
throughout and recomputes nothing. The short requests (chat, no max_tokens, as chat
clients send them) hang up after their first token, so each measures TTFT behind the long
request exactly when an escalation's recompute is due. The trained length is set to
`--trained` (default 512) on the default model so that 3 L fits a CPU run; quality plays
no part here, only cost.

    .venv/bin/python benchmarks/bench_escalation.py --repeats 2
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(__file__))
from timing import environment, write_json  # noqa: E402

from yarn_vllm.tools.bench.online import percentile  # noqa: E402
from yarn_vllm.tools.models import resolve_model  # noqa: E402
from yarn_vllm.tools.testing.server_process import LocalServer  # noqa: E402

ESCALATED = re.compile(r"escalated from s=([\d.]+) to s=([\d.]+) before its token (\d+); "
                       r"(\d+) tokens recomputed")


def _text(n_words: int, seed: int) -> str:
    import random

    rng = random.Random(seed)
    words = ["river", "stone", "lamp", "orbit", "maple", "signal", "copper", "harbor", "violet",
             "engine", "meadow", "cipher", "lantern", "quartz", "summit", "tunnel"]
    return " ".join(rng.choice(words) for _ in range(n_words))


def _stream(client, url: str, body: dict, on_token=None) -> dict:
    """One streamed chat completion: TTFT, content chunks and latency (seconds), and the
    usage. `on_token(n, usage)` after each content chunk returns True to hang up."""
    body = dict(body, stream=True, temperature=0,
                stream_options={"include_usage": True, "continuous_usage_stats": True})
    t0, ttft, n, usage = time.perf_counter(), None, 0, None
    with client.stream("POST", url + "/v1/chat/completions", json=body) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            usage = chunk.get("usage") or usage
            if any(c.get("delta", {}).get("content") for c in chunk.get("choices", [])):
                n += 1
                ttft = ttft or time.perf_counter() - t0
                if on_token is not None and on_token(n, usage):
                    break  # the client hangs up: vLLM aborts the request
    return {"ttft_s": ttft, "chunks": n, "latency_s": time.perf_counter() - t0, "usage": usage}


def _chat(model: str, content: str) -> dict:
    """A chat request without max_tokens, as chat clients send it."""
    return {"model": model, "messages": [{"role": "user", "content": content}]}


def one_round(url: str, model: str, args, seed: int) -> dict:
    import httpx

    long_words = int(0.9 * args.trained / 1.3)  # ~1.3 tokens a word in SmolLM2's tokenizer
    shorts, threads, fired = [], [], set()

    def short(i):
        with httpx.Client(timeout=None) as c:
            shorts.append(_stream(c, url, _chat(model, _text(40, seed * 100 + i)),
                                  lambda n, usage: True))

    def crossing(n, usage):
        """Fire the shorts a few tokens before the long request crosses L and 2 L."""
        prompt = (usage or {}).get("prompt_tokens")
        for k in (1, 2):
            if prompt and k not in fired and prompt + n >= k * args.trained - 4:
                fired.add(k)
                for i in range(args.shorts_per_crossing):
                    threads.append(threading.Thread(target=short, args=(k * 10 + i,)))
                    threads[-1].start()
        return False

    with httpx.Client(timeout=None) as c:  # ignore_eos: it runs to the end of the context
        long_run = _stream(c, url, dict(_chat(model, _text(long_words, seed)), ignore_eos=True),
                           crossing)
    for t in threads:
        t.join()
    ttfts = [s["ttft_s"] for s in shorts if s["ttft_s"] is not None]
    return {"long_latency_s": long_run["latency_s"], "long_usage": long_run["usage"],
            "short_ttft_s": ttfts, "short_ttft_p50_s": percentile(ttfts, 50),
            "short_ttft_p99_s": percentile(ttfts, 99)}


def bench(name: str, mode: str, args) -> dict:
    model = resolve_model(args.model)
    factor = 3.0
    serve_args = ["--factor", str(factor), "--original-max-position", str(args.trained),
                  "--yarn-mode", mode, *args.vllm_args]
    if mode == "request":  # the default 512 is a whole window at L = 512: scale it with L
        serve_args += ["--request-reserve", str(args.trained * 512 // 8192)]
    log = os.path.join(args.log_dir, f"escalation_{name}.log")
    print(f"[{name}] yarn-vllm serve {' '.join(serve_args)} (log: {log})", flush=True)
    with LocalServer(model, serve_args, log_path=log) as server:
        import httpx

        with httpx.Client(timeout=None) as c:
            served = c.get(server.url + "/v1/models").json()["data"][0]["id"]
            _stream(c, server.url, _chat(served, "warm up"), lambda n, usage: True)
        rounds = []
        for r in range(args.repeats):
            row = one_round(server.url, served, args, seed=r + 1)
            rounds.append(row)
            print(f"[{name}] round {r + 1}: long {row['long_latency_s']:.1f} s for "
                  f"{row['long_usage']}, short TTFT p50 {row['short_ttft_p50_s']:.2f} s "
                  f"p99 {row['short_ttft_p99_s']:.2f} s", flush=True)
        escalations = [tuple(map(float, m.groups())) for m in ESCALATED.finditer(server.log())]
    latency = sorted(x["long_latency_s"] for x in rounds)
    p50 = sorted(x["short_ttft_p50_s"] for x in rounds)
    p99 = sorted(x["short_ttft_p99_s"] for x in rounds)
    return {"config": name, "mode": mode, "serve_args": serve_args, "rounds": rounds,
            "escalations": [{"old": a, "new": b, "before_token": int(c), "recomputed": int(d)}
                            for a, b, c, d in escalations],
            "long_latency_s_median": latency[len(latency) // 2],
            "long_latency_s_range": [latency[0], latency[-1]],
            "short_ttft_p50_s_median": p50[len(p50) // 2], "short_ttft_p50_s_range": [p50[0], p50[-1]],
            "short_ttft_p99_s_median": p99[len(p99) // 2], "short_ttft_p99_s_range": [p99[0], p99[-1]]}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--trained", type=int, default=512, help="L for this run (tokens)")
    p.add_argument("--shorts-per-crossing", type=int, default=4)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--log-dir", default="bench_results")
    p.add_argument("--out", default="bench_results/escalation.json")
    args, vllm_args = p.parse_known_args(argv)
    args.vllm_args = vllm_args
    os.makedirs(args.log_dir, exist_ok=True)
    rows = [bench("request", "request", args), bench("static", "static", args)]
    base = rows[1]["long_latency_s_median"]
    print(f"{'config':>8} {'long request (s)':>18} {'vs static':>10} {'recomputed':>11} "
          f"{'short TTFT p50 (s)':>19} {'p99 (s)':>8}")
    for row in rows:
        recomputed = sum(e["recomputed"] for e in row["escalations"])
        print(f"{row['config']:>8} {row['long_latency_s_median']:>10.1f} "
              f"({row['long_latency_s_range'][0]:.1f}-{row['long_latency_s_range'][1]:.1f}) "
              f"{row['long_latency_s_median'] / base:>9.2f}x {recomputed:>11} "
              f"{row['short_ttft_p50_s_median']:>19.2f} {row['short_ttft_p99_s_median']:>8.2f}")
    write_json(args.out, {"environment": environment(), "args": vars(args), "rows": rows})


if __name__ == "__main__":
    main()
