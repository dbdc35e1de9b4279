"""Orchestrate the evaluations: one vLLM engine per method, each in its own process."""

from __future__ import annotations

import json
import os
import time
from importlib import resources

from yarn_vllm.engine_worker import run_engine
from yarn_vllm.eval.perplexity import aggregate, default_bucket_edges, sliding_windows, token_nll
from yarn_vllm.methods import method_overrides


def default_text() -> str:
    """The shipped public-domain text (see yarn_vllm/data/SOURCES.md)."""
    return resources.files("yarn_vllm").joinpath("data/lcet10.txt").read_text(encoding="utf-8")


def _hf_config(model: str) -> dict:
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(model).to_dict()


def method_factor(hf_config: dict, longest: int, factor: float | None) -> float:
    """The extension factor: given, or the smallest that covers the longest context."""
    return factor or max(1.0, longest / hf_config["max_position_embeddings"])


def engine_spec(model: str, method: str, hf_config: dict, factor: float, prompts, sampling,
                llm_kwargs: dict | None = None) -> dict:
    overrides = method_overrides(method, hf_config, factor)
    # Room for the generated tokens past a window of exactly s x L. The RoPE maths
    # reads factor and original from rope_parameters, so this changes only the limit.
    overrides["max_position_embeddings"] += 16
    kwargs = {"hf_overrides": overrides, "max_model_len": overrides["max_position_embeddings"],
              "enable_prefix_caching": False, **(llm_kwargs or {})}
    return {"model": model, "llm_kwargs": kwargs, "prompts": prompts, "sampling": sampling,
            "progress": True}


def eval_perplexity(model: str, methods: list[str], windows: list[int], *, stride: int | None = None,
                    max_windows: int | None = 1, text: str | None = None,
                    factor: float | None = None, llm_kwargs: dict | None = None,
                    log=print) -> dict:
    """Perplexity per method and window size: {method: {window: aggregate(...)}}."""
    from transformers import AutoTokenizer

    hf = _hf_config(model)
    ids = AutoTokenizer.from_pretrained(model).encode(text or default_text(),
                                                      add_special_tokens=False)
    plan = {w: sliding_windows(len(ids), w, stride or w, max_windows) for w in windows}
    prompts = [ids[x.begin:x.end] for w in windows for x in plan[w]]
    s = method_factor(hf, max(windows), factor)
    results = {"model": model, "factor": s, "text_tokens": len(ids), "windows": windows,
               "stride": stride, "methods": {}}
    for method in methods:
        t0 = time.perf_counter()
        out = run_engine(engine_spec(model, method, hf, s, prompts,
                                     {"max_tokens": 1, "prompt_logprobs": 0, "detokenize": False},
                                     llm_kwargs))
        outputs, per_window = iter(out["outputs"]), {}
        for w in windows:
            nll = [token_nll(next(outputs)["prompt_logprobs"], p)
                   for p in (ids[x.begin:x.end] for x in plan[w])]
            per_window[str(w)] = aggregate(plan[w], nll, default_bucket_edges(w))
        results["methods"][method] = {"seconds": time.perf_counter() - t0,
                                      "generate_seconds": out["generate_seconds"],
                                      "ppl": per_window}
        log(f"  {method:>13}: " + "  ".join(f"{w}: {per_window[str(w)]['ppl']:.2f}"
                                             for w in windows)
            + f"  ({time.perf_counter() - t0:.0f} s)")
    return results


def eval_passkey(model: str, methods: list[str], lengths: list[int], depths: list[float],
                 trials: int, *, factor: float | None = None, llm_kwargs: dict | None = None,
                 log=print) -> dict:
    """Passkey accuracy per method, length and depth."""
    from transformers import AutoTokenizer

    from yarn_vllm.tasks.passkey import make_passkey_prompt

    hf = _hf_config(model)
    tok = AutoTokenizer.from_pretrained(model)
    cases = [(L, d, t, make_passkey_prompt(tok, L, d, seed=1000 * t + int(100 * d) + L))
             for L in lengths for d in depths for t in range(trials)]
    s = method_factor(hf, max(lengths) + 16, factor)
    results = {"model": model, "factor": s, "lengths": lengths, "depths": depths,
               "trials": trials, "methods": {}}
    for method in methods:
        t0 = time.perf_counter()
        out = run_engine(engine_spec(model, method, hf, s, [c[3].token_ids for c in cases],
                                     {"max_tokens": 8}, llm_kwargs))
        grid, answers = {}, []
        for (L, d, t, prompt), o in zip(cases, out["outputs"]):
            cell = grid.setdefault(f"{L}", {}).setdefault(f"{d}", {"found": 0, "trials": 0})
            cell["found"] += prompt.is_found(o["text"])
            cell["trials"] += 1
            answers.append({"length": L, "depth": d, "trial": t, "key": prompt.key,
                            "text": o["text"]})
        results["methods"][method] = {"seconds": time.perf_counter() - t0,
                                      "generate_seconds": out["generate_seconds"],
                                      "grid": grid, "answers": answers}
        log(f"  {method:>13}: " + "  ".join(
            f"{L}: {sum(c['found'] for c in grid[str(L)].values())}/"
            f"{sum(c['trials'] for c in grid[str(L)].values())}" for L in lengths)
            + f"  ({time.perf_counter() - t0:.0f} s)")
    return results


def _cell(value, fmt: str = "{:.2f}") -> str:
    return "–" if value is None else fmt.format(value)


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    """A markdown table; the first column is left-aligned, the rest right-aligned."""
    return "\n".join(["| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 1)]
                     + ["| " + " | ".join(row) + " |" for row in rows])


def perplexity_cells(results: dict) -> tuple[list[int], dict[str, list[float | None]]]:
    """Windows and, per method, the perplexity per window (None where not measured)."""
    windows = results["windows"]
    return windows, {m: [r["ppl"].get(str(w), {}).get("ppl") for w in windows]
                     for m, r in results["methods"].items()}


def passkey_cells(results: dict) -> tuple[list[tuple[int, float]], dict[str, list]]:
    """(length, depth) columns and, per method, (found, trials) per column (None: not run)."""
    cols = [(L, d) for L in results["lengths"] for d in results["depths"]]
    out = {}
    for m, r in results["methods"].items():
        cells = [r["grid"].get(str(L), {}).get(str(d)) for L, d in cols]
        out[m] = [None if c is None else (c["found"], c["trials"]) for c in cells]
    return cols, out


def _window_label(results: dict, w: int) -> str:
    factors = results.get("factors")  # {window: s} when windows ran at different factors
    if factors and len(set(factors.values())) > 1:
        return f"{w:,} (s={factors[str(w)]:g})"
    return f"{w:,}"


def perplexity_table(results: dict, labels: dict | None = None) -> str:
    windows, ppl = perplexity_cells(results)
    return markdown_table(["method"] + [_window_label(results, w) for w in windows],
                          [[(labels or {}).get(m, m)] + [_cell(v) for v in row]
                           for m, row in ppl.items()])


def passkey_table(results: dict, labels: dict | None = None) -> str:
    cols, cells = passkey_cells(results)
    rows = []
    for m, row in cells.items():
        done = [c for c in row if c]
        total = f"{sum(c[0] for c in done)}/{sum(c[1] for c in done)}" if done else "–"
        rows.append([(labels or {}).get(m, m)]
                    + ["–" if c is None else f"{c[0]}/{c[1]}" for c in row] + [total])
    return markdown_table(["method"] + [f"{L // 1024}k @ {d:.0%}" for L, d in cols] + ["found"],
                          rows)


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _title(results: dict) -> str:
    factors = results.get("factors")  # {window: s}
    if factors and len(set(factors.values())) > 1:
        by_factor: dict[float, list[int]] = {}
        for w in sorted(factors, key=int):
            by_factor.setdefault(factors[w], []).append(int(w) // 1024)
        s = "; ".join(f"s={f:g} at {', '.join(f'{k}k' for k in ks)}"
                      for f, ks in by_factor.items())
    else:
        s = f"s={results['factor']:g}"
    return f"{os.path.basename(results['model'].rstrip('/'))}, {s}"


def plot_perplexity(results: dict, path: str) -> None:
    plt = _pyplot()
    windows, ppl = perplexity_cells(results)
    fig, ax = plt.subplots(figsize=(6, 4))
    for method, row in ppl.items():
        pts = [(w, v) for w, v in zip(windows, row) if v is not None]
        if pts:
            ax.plot(*zip(*pts), marker="o", label=method)
    ax.set_xscale("log", base=2)
    ax.set_xticks(windows, [f"{w // 1024}k" for w in windows])
    ax.set_yscale("log")
    ax.set_xlabel("context window (tokens)")
    ax.set_ylabel("perplexity")
    ax.set_title(_title(results), fontsize=9)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_passkey(results: dict, path: str) -> None:
    """One length x depth heatmap per method; cells read found/trials, grey where not run."""
    plt = _pyplot()
    _, cells = passkey_cells(results)
    lengths, depths = results["lengths"], results["depths"]
    fig, axes = plt.subplots(1, len(cells), figsize=(2.6 * len(cells), 2.8), squeeze=False)
    for ax, (method, row) in zip(axes[0], cells.items()):
        at = dict(zip([(L, d) for L in lengths for d in depths], row))
        acc = [[float("nan") if at[L, d] is None else at[L, d][0] / at[L, d][1] for L in lengths]
               for d in depths]
        ax.imshow(acc, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
        for i, d in enumerate(depths):
            for j, L in enumerate(lengths):
                ax.text(j, i, "–" if at[L, d] is None else f"{at[L, d][0]}/{at[L, d][1]}",
                        ha="center", va="center", fontsize=9)
        ax.set_xticks(range(len(lengths)), [f"{L // 1024}k" for L in lengths])
        ax.set_yticks(range(len(depths)), [f"{d:.0%}" for d in depths])
        ax.set_title(method)
        ax.set_xlabel("length")
    axes[0][0].set_ylabel("depth")
    fig.suptitle(_title(results), fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


REPORTS = {"perplexity": (perplexity_table, plot_perplexity),
           "passkey": (passkey_table, plot_passkey)}


def write_outputs(results: dict, out_dir: str, name: str) -> None:
    """{name}.json, .md (the table) and .png under out_dir; name is a key of REPORTS."""
    table_fn, plot_fn = REPORTS[name]
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, f"{name}.json"), "w") as f:
        json.dump(results, f, indent=2)
    table = table_fn(results)
    with open(os.path.join(out_dir, f"{name}.md"), "w") as f:
        f.write(table + "\n")
    plot_fn(results, os.path.join(out_dir, f"{name}.png"))
    print(table)
    print(f"wrote {out_dir}/{name}.json, .md, .png")
