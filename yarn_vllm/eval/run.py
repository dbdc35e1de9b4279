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
        results["methods"][method] = {"seconds": time.perf_counter() - t0, "ppl": per_window}
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
        grid = {}
        for (L, d, t, prompt), o in zip(cases, out["outputs"]):
            cell = grid.setdefault(f"{L}", {}).setdefault(f"{d}", {"found": 0, "trials": 0})
            cell["found"] += prompt.is_found(o["text"])
            cell["trials"] += 1
        results["methods"][method] = {"seconds": time.perf_counter() - t0, "grid": grid}
        log(f"  {method:>13}: " + "  ".join(
            f"{L}: {sum(c['found'] for c in grid[str(L)].values())}/"
            f"{sum(c['trials'] for c in grid[str(L)].values())}" for L in lengths)
            + f"  ({time.perf_counter() - t0:.0f} s)")
    return results


def perplexity_table(results: dict) -> str:
    windows = results["windows"]
    lines = ["| method | " + " | ".join(f"{w:,}" for w in windows) + " |",
             "|---|" + "---|" * len(windows)]
    for method, r in results["methods"].items():
        lines.append(f"| {method} | " + " | ".join(f"{r['ppl'][str(w)]['ppl']:.2f}"
                                                   for w in windows) + " |")
    return "\n".join(lines)


def passkey_table(results: dict) -> str:
    lengths = results["lengths"]
    lines = ["| method | " + " | ".join(f"{L:,}" for L in lengths) + " |",
             "|---|" + "---|" * len(lengths)]
    for method, r in results["methods"].items():
        cells = []
        for L in lengths:
            g = r["grid"][str(L)].values()
            cells.append(f"{sum(c['found'] for c in g)}/{sum(c['trials'] for c in g)}")
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_perplexity(results: dict, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for method, r in results["methods"].items():
        ys = [r["ppl"][str(w)]["ppl"] for w in results["windows"]]
        ax.plot(results["windows"], ys, marker="o", label=method)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("context window (tokens)")
    ax.set_ylabel("perplexity")
    ax.set_title(f"{os.path.basename(results['model'].rstrip('/'))}, s={results['factor']:g}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_passkey(results: dict, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = list(results["methods"])
    fig, axes = plt.subplots(1, len(methods), figsize=(3 * len(methods), 3), squeeze=False)
    for ax, method in zip(axes[0], methods):
        grid = results["methods"][method]["grid"]
        acc = [[grid[str(L)][str(d)]["found"] / grid[str(L)][str(d)]["trials"]
                for L in results["lengths"]] for d in results["depths"]]
        ax.imshow(acc, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
        ax.set_xticks(range(len(results["lengths"])), [f"{L // 1024}k" for L in results["lengths"]])
        ax.set_yticks(range(len(results["depths"])), [f"{d:.0%}" for d in results["depths"]])
        ax.set_title(method)
        ax.set_xlabel("length")
    axes[0][0].set_ylabel("depth")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_outputs(results: dict, out_dir: str, name: str) -> None:
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, f"{name}.json"), "w") as f:
        json.dump(results, f, indent=2)
    table = perplexity_table(results) if name == "perplexity" else passkey_table(results)
    with open(os.path.join(out_dir, f"{name}.md"), "w") as f:
        f.write(table + "\n")
    (plot_perplexity if name == "perplexity" else plot_passkey)(
        results, os.path.join(out_dir, f"{name}.png"))
    print(table)
    print(f"wrote {out_dir}/{name}.json, .md, .png")


