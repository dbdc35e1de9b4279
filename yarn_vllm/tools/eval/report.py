"""Evaluation outputs: markdown tables, plots, and the JSON/MD/PNG files of one run.

yarn_vllm.tools.eval.run produces the results; this module only renders them (as
yarn_vllm.tools.bench.report does for the benchmarks), so the results suite can re-render
stored results without running anything.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile


@contextlib.contextmanager
def replacing(path: str):
    """Yield a fresh temporary path beside `path`; on success it replaces `path` atomically.

    The name is unique (mkstemp), so two runs writing the same file never move each
    other's half-written output into place; readers see the old file or the new, never
    a partial one. It keeps `path`'s extension (matplotlib picks the format from it).
    On an error the temporary file is removed and `path` is left as it was.
    """
    folder, base = os.path.split(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{base}.", suffix=os.path.splitext(base)[1])
    os.close(fd)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp's 0600 would otherwise stick to the result
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _umask() -> int:
    """This process's umask, read without setting it (os.umask would race other threads)."""
    try:
        with open("/proc/self/status") as f:
            return int(next(ln for ln in f if ln.startswith("Umask:")).split()[1], 8)
    except (OSError, StopIteration, ValueError):
        return 0o022


def write_text(path: str, text: str) -> None:
    """`path` replaced atomically by `text` (UTF-8); see `replacing`."""
    with replacing(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        f.write(text)


def _savefig(fig, path: str) -> None:
    with replacing(path) as tmp:
        fig.savefig(tmp, dpi=120)


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
    _savefig(fig, path)
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
    _savefig(fig, path)
    plt.close(fig)


REPORTS = {"perplexity": (perplexity_table, plot_perplexity),
           "passkey": (passkey_table, plot_passkey)}


def write_outputs(results: dict, out_dir: str, name: str) -> None:
    """{name}.json, .md (the table) and .png under out_dir; name is a key of REPORTS."""
    table_fn, plot_fn = REPORTS[name]
    os.makedirs(out_dir, exist_ok=True)
    write_text(os.path.join(out_dir, f"{name}.json"), json.dumps(results, indent=2))
    table = table_fn(results)
    write_text(os.path.join(out_dir, f"{name}.md"), table + "\n")
    plot_fn(results, os.path.join(out_dir, f"{name}.png"))
    print(table)
    print(f"wrote {out_dir}/{name}.json, .md, .png")
