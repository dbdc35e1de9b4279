"""`yarn-vllm bench online URL`: TTFT and TPOT percentiles against a running OpenAI server.

Each request streams a completion of exactly `output_tokens` tokens (`ignore_eos`, vLLM's
extension) for a prompt of `context` random token ids; `concurrency` requests are in flight
at once. Per request:
  TTFT = time from sending the request to the first streamed token;
  TPOT = (time of the last token - time of the first) / (output tokens - 1),
with the output token count taken from the server's usage report.

A server started with an API key gets it as a Bearer token: `--api-key`, else the
environment's OPENAI_API_KEY or VLLM_API_KEY (the variable `yarn-vllm serve` hands the key
to vLLM in); a refused key is one line naming the fix, not a traceback.
"""

from __future__ import annotations

import json
import random
import time
import os
from concurrent.futures import ThreadPoolExecutor

from yarn_vllm.errors import UserError

PERCENTILES = (50, 90, 99)
KEY_VARIABLES = ("OPENAI_API_KEY", "VLLM_API_KEY")  # read in this order when no --api-key


def api_key_of(given: str | None, env: dict | None = None) -> str | None:
    """The key to send: `given`, else the first of KEY_VARIABLES set in `env` (os.environ)."""
    env = os.environ if env is None else env
    return given or next((env[k] for k in KEY_VARIABLES if env.get(k)), None)


def _refused(status: int, sent_key: bool, url: str) -> UserError:
    if not sent_key:
        return UserError("--api-key", f"is not set and {url} answered HTTP {status}: the "
                         "server wants a key", "pass --api-key KEY or set OPENAI_API_KEY / "
                         "VLLM_API_KEY to the server's key", source="bench online")
    return UserError("--api-key", f"was refused by {url} (HTTP {status})", "give the key the "
                     "server was started with", source="bench online")


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile with linear interpolation between closest ranks (numpy's default)."""
    xs = sorted(values)
    if not xs:
        raise ValueError("no values")
    pos = (len(xs) - 1) * q / 100
    lo = int(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def server_model(url: str, client) -> dict:
    """The first model the server lists: {"id", "root", "max_model_len"}."""
    r = client.get(url.rstrip("/") + "/v1/models")
    if r.status_code in (401, 403):
        raise _refused(r.status_code, "Authorization" in client.headers, url)
    r.raise_for_status()
    return r.json()["data"][0]


def vocab_size_of(model_root: str | None, default: int = 1000) -> int:
    """The served model's vocabulary size when its config is readable here, else `default`."""
    if model_root:
        try:
            from transformers import AutoConfig

            return int(AutoConfig.from_pretrained(model_root).vocab_size)
        except Exception:  # noqa: BLE001 - a hub name or folder we cannot read
            pass
    return default


def stream_one(client, url: str, model: str, prompt: list[int], output_tokens: int) -> dict:
    """One streamed completion; returns its timings and token count."""
    body = {"model": model, "prompt": prompt, "max_tokens": output_tokens, "temperature": 0.0,
            "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    first = last = None
    chunks, usage = 0, None
    with client.stream("POST", url.rstrip("/") + "/v1/completions", json=body) as r:
        if r.status_code != 200:
            r.read()
            raise RuntimeError(f"HTTP {r.status_code}: {r.text[:300]}")
        for line in r.iter_lines():
            if not line.startswith("data:"):
                continue
            data = line[5:].strip()
            if data == "[DONE]":
                break
            event = json.loads(data)
            if event.get("usage"):
                usage = event["usage"]
            if event.get("choices"):
                now = time.perf_counter()
                first = first if first is not None else now
                last = now
                chunks += 1
    if first is None:
        raise RuntimeError("the stream carried no tokens")
    n = usage["completion_tokens"] if usage else chunks
    return {"ttft_s": first - t0, "tpot_s": (last - first) / (n - 1) if n > 1 else None,
            "latency_s": last - t0, "output_tokens": n, "prompt_tokens": len(prompt)}


def run_online(url: str, contexts, *, num_requests: int = 8, concurrency: int = 4,
               output_tokens: int = 32, model: str | None = None, vocab_size: int | None = None,
               seed: int = 0, timeout: float = 3600, api_key: str | None = None,
               log=print) -> dict:
    """TTFT/TPOT percentiles per context length against the server at `url`; `api_key`
    (else api_key_of's environment variables) goes as a Bearer token."""
    import httpx

    rng = random.Random(seed)
    out = {"settings": {"url": url, "contexts": list(contexts), "num_requests": num_requests,
                        "concurrency": concurrency, "output_tokens": output_tokens},
           "rows": []}
    key = api_key_of(api_key)
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    with httpx.Client(timeout=timeout, headers=headers) as client:
        info = server_model(url, client)
        model = model or info["id"]
        vocab = vocab_size or vocab_size_of(info.get("root"))
        out["settings"].update(model=model, vocab_size=vocab)
        low = min(100, vocab // 4)
        for context in contexts:
            prompts = [[rng.randrange(low, vocab) for _ in range(context)]
                       for _ in range(num_requests)]
            t0 = time.perf_counter()
            with ThreadPoolExecutor(concurrency) as pool:
                reqs = list(pool.map(lambda p: stream_one(client, url, model, p, output_tokens),
                                     prompts))
            wall = time.perf_counter() - t0
            row = {"context": context, "requests": len(reqs), "concurrency": concurrency,
                   "wall_s": wall, "output_tok_s": sum(r["output_tokens"] for r in reqs) / wall,
                   "per_request": reqs}
            for key in ("ttft_s", "tpot_s", "latency_s"):
                vals = [r[key] for r in reqs if r[key] is not None]
                for q in PERCENTILES:
                    row[f"{key[:-2]}_p{q}_ms"] = 1e3 * percentile(vals, q) if vals else None
            out["rows"].append(row)
            log(f"  ctx {context:>6}: TTFT p50/p90/p99 {row['ttft_p50_ms']:.0f}/"
                f"{row['ttft_p90_ms']:.0f}/{row['ttft_p99_ms']:.0f} ms  TPOT "
                f"{_ms(row['tpot_p50_ms'])}/{_ms(row['tpot_p90_ms'])}/{_ms(row['tpot_p99_ms'])} "
                f"ms  ({len(reqs)} requests, {wall:.1f} s)")
    return out


def _ms(x):
    return "–" if x is None else f"{x:.1f}"


ONLINE_FIELDS = ("context", "requests", "concurrency", "wall_s", "output_tok_s",
                 *(f"{k}_p{q}_ms" for k in ("ttft", "tpot", "latency") for q in PERCENTILES))


def write_online(results: dict, out_dir: str, name: str = "online", log=print) -> dict:
    """{name}.json, .csv and .png (TTFT and TPOT percentiles against context length)."""
    import csv
    import os

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from yarn_vllm.tools.bench.report import output_paths

    paths = output_paths(out_dir, name)
    os.makedirs(out_dir, exist_ok=True)
    with open(paths["json"], "w") as f:
        json.dump(results, f, indent=2)
    with open(paths["csv"], "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=ONLINE_FIELDS, extrasaction="ignore")
        w.writeheader()
        w.writerows(results["rows"])
    rows = results["rows"]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, key, label in ((axes[0], "ttft", "time to first token, ms"),
                           (axes[1], "tpot", "time per output token, ms")):
        for q in PERCENTILES:
            pts = [(r["context"], r[f"{key}_p{q}_ms"]) for r in rows
                   if r[f"{key}_p{q}_ms"] is not None]
            if pts:
                ax.plot(*zip(*pts), marker="o", label=f"p{q}")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("context length (tokens)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend()
    s = results["settings"]
    fig.suptitle(f"{s.get('model')} at {s['url']}, concurrency {s['concurrency']}")
    fig.tight_layout()
    fig.savefig(paths["png"], dpi=110)
    plt.close(fig)
    log(f"wrote {paths['json']}, {paths['csv']}, {paths['png']}")
    return paths
