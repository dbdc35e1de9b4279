"""Benchmark outputs: JSON, CSV, PNG plots, and the ratio table against vLLM's own YaRN."""

from __future__ import annotations

import csv
import json
import os

from yarn_vllm.errors import UserError

METRICS = ("prefill_tok_s", "decode_tok_s", "e2e_tok_s")
CSV_FIELDS = ("method", "context", "batch", "output_tokens", "prefill_tok_s", "decode_tok_s",
              "e2e_tok_s", "prefill_s", "decode_s", "total_s", "tpot_ms", "ttft_mean_s",
              "repeats")
BASELINE = "vllm-yarn"


def ratios(rows: list[dict], baseline: str = BASELINE) -> list[dict]:
    """Each non-baseline row's metrics divided by the baseline's at the same context and batch."""
    base = {(r["context"], r["batch"]): r for r in rows if r["method"] == baseline}
    out = []
    for r in rows:
        b = base.get((r["context"], r["batch"]))
        if r["method"] == baseline or b is None:
            continue
        out.append({"method": r["method"], "context": r["context"], "batch": r["batch"],
                    **{m: r[m] / b[m] if r.get(m) and b.get(m) else None for m in METRICS}})
    return out


def _fmt(x, spec=".1f"):
    return "–" if x is None else format(x, spec)


def markdown_table(rows: list[dict], metric: str = "prefill_tok_s") -> str:
    """Methods as rows, (context, batch) as columns, `metric` in the cells."""
    cols = sorted({(r["context"], r["batch"]) for r in rows})
    methods = list(dict.fromkeys(r["method"] for r in rows))
    cell = {(r["method"], r["context"], r["batch"]): r.get(metric) for r in rows}
    multi_batch = len({b for _, b in cols}) > 1
    head = [f"{c:,}" + (f" ×{b}" if multi_batch else "") for c, b in cols]
    lines = ["| method | " + " | ".join(head) + " |", "|---|" + "---:|" * len(cols)]
    for m in methods:
        lines.append(f"| {m} | " + " | ".join(_fmt(cell.get((m, c, b))) for c, b in cols) + " |")
    return "\n".join(lines)


def ratio_table(rows: list[dict]) -> str:
    rs = ratios(rows)
    if not rs:
        return f"(no ratios: {BASELINE} was not run)"
    lines = [f"| method | context | batch | prefill / {BASELINE} | decode / {BASELINE} | "
             f"e2e / {BASELINE} |", "|---|---:|---:|---:|---:|---:|"]
    for r in rs:
        lines.append(f"| {r['method']} | {r['context']:,} | {r['batch']} | "
                     + " | ".join(_fmt(r[m], ".2f") + ("x" if r[m] else "") for m in METRICS)
                     + " |")
    return "\n".join(lines)


def write_csv(rows: list[dict], path: str) -> None:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_FIELDS, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({k: r.get(k) for k in CSV_FIELDS})


def plot(rows: list[dict], path: str, title: str = "") -> None:
    """Throughput (prefill, decode) and latency (TTFT, per-token) against context length."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("prefill_tok_s", "prefill tokens/s"), ("decode_tok_s", "decode tokens/s"),
              ("prefill_s", "time to first token, s (batch prefill)"),
              ("tpot_ms", "time per output token, ms")]
    fig, axes = plt.subplots(2, 2, figsize=(10, 7))
    batches = sorted({r["batch"] for r in rows})
    for ax, (key, label) in zip(axes.flat, panels):
        for name in dict.fromkeys(r["method"] for r in rows):
            for b in batches:
                pts = sorted((r["context"], r[key]) for r in rows
                             if r["method"] == name and r["batch"] == b and r.get(key) is not None)
                if pts:
                    ax.plot(*zip(*pts), marker="o",
                            label=name + (f" ×{b}" if len(batches) > 1 else ""))
        ax.set_xscale("log", base=2)
        ax.set_xlabel("context length (tokens)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes.flat[0].legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# x86 ISA extensions that decide which attention kernels run: /proc/cpuinfo flag -> name
ISA_FLAGS = (("avx2", "AVX2"), ("avx512f", "AVX-512"), ("avx512_bf16", "AVX512-BF16"),
             ("amx_tile", "AMX"))


def cpu_platform(dtypes=("float32", "bfloat16"), block_size: int = 128,
                 head_size: int | None = None) -> dict:
    """What CPU numbers were measured on: the CPU, its ISA, the kernel path vLLM's CPU_ATTN
    takes for each dtype (its _get_attn_isa: "amx", "vec", "vec16", ...; an engine's
    default block size is 128), the 1-minute load. Which of these a machine has decides
    whether our kernels or vLLM's are faster, so every CPU benchmark records it."""
    info = {"cpu": "", "isa": [], "vllm_cpu_attn": {}, "loadavg_1m": os.getloadavg()[0]}
    try:
        with open("/proc/cpuinfo") as f:
            lines = f.read().splitlines()
    except OSError:
        lines = []
    fields = dict(line.split(":", 1) for line in lines if ":" in line)
    fields = {k.strip(): v.strip() for k, v in fields.items()}
    info["cpu"] = fields.get("model name", "")
    flags = set(fields.get("flags", "").split())
    info["isa"] = [name for flag, name in ISA_FLAGS if flag in flags]
    try:
        import torch
        from vllm.v1.attention.backends.cpu_attn import _get_attn_isa

        info["vllm_cpu_attn"] = {d: _get_attn_isa(getattr(torch, d), block_size, head_size)
                                 for d in dtypes}
    except Exception as e:  # noqa: BLE001 - a record, not a requirement
        info["vllm_cpu_attn"] = {"unknown": f"{type(e).__name__}: {e}"}
    return info


def platform_line(info: dict) -> str:
    """One line of cpu_platform's record, for a benchmark's log."""
    attn = ", ".join(f"{k} {v}" for k, v in info["vllm_cpu_attn"].items())
    isa = ", ".join(info["isa"]) or "none of " + "/".join(name for _, name in ISA_FLAGS)
    return (f"CPU: {info['cpu'] or 'unknown'}; ISA: {isa}; vLLM CPU_ATTN path: {attn}; "
            f"load {info['loadavg_1m']:.2f}")


def output_paths(out_dir: str, name: str, exts=("json", "csv", "png"), *,
                 source: str = "bench") -> dict[str, str]:
    """{ext: out_dir/name.ext}. `name` must be a plain file name, so that `--name ../x`
    (or an absolute path) cannot write outside `out_dir`."""
    if (not name or name in (".", "..") or os.path.basename(name) != name
            or any(c in name for c in "/\\\0")):
        raise UserError("--name", f"is {name!r}, not a plain file name",
                        "give a name without a folder, e.g. offline (--out chooses the folder)",
                        source=source)
    return {ext: os.path.join(out_dir, f"{name}.{ext}") for ext in exts}


def write_offline(results: dict, out_dir: str, name: str = "offline", log=print) -> dict:
    """Write {name}.json/.csv/.png under out_dir; returns the paths."""
    paths = output_paths(out_dir, name)
    os.makedirs(out_dir, exist_ok=True)
    rows = results["rows"]
    results["ratios"] = ratios(rows)
    dtypes = sorted({r["dtype"] for r in results.get("methods", {}).values() if "dtype" in r})
    results.setdefault("platform", cpu_platform(dtypes or ("float32", "bfloat16")))
    with open(paths["json"], "w") as f:
        json.dump(results, f, indent=2)
    write_csv(rows, paths["csv"])
    s = results["settings"]
    plot(rows, paths["png"], f"{os.path.basename(s['model'].rstrip('/'))}, "
                             f"YaRN s={s['factor']:g}, {s['output_tokens']} output tokens"
                             + "".join(f", {d}" for d in dtypes))
    for metric in METRICS:
        log(f"\n{metric.replace('_tok_s', '')} tokens/s:\n" + markdown_table(rows, metric))
    log(f"\nratios against vLLM's own YaRN ({BASELINE}; above 1 = faster):\n" + ratio_table(rows))
    log(platform_line(results["platform"]))
    log(f"\nwrote {paths['json']}, {paths['csv']}, {paths['png']}")
    return paths
