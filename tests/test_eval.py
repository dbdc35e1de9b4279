"""Evaluation machinery at small sizes, on the real default model where it matters."""

from __future__ import annotations

import json
import math

import pytest
import torch

from yarn_vllm.tools.eval.perplexity import aggregate, default_bucket_edges, sliding_windows
from yarn_vllm.tools.methods import method_overrides

SMOL = {"model_type": "llama", "hidden_size": 576, "num_attention_heads": 9, "head_dim": 64,
        "max_position_embeddings": 8192, "rope_parameters": {"rope_type": "default",
                                                             "rope_theta": 100000.0}}


def test_sliding_windows_score_each_token_once():
    for n, w, s in [(100, 10, 10), (100, 10, 3), (37, 8, 5)]:
        wins = sliding_windows(n, w, s)
        scored = [p for x in wins for p in range(x.score_from, x.end)]
        # every token some window can predict (it has a predecessor in that window), once
        predictable = sorted({p for x in wins for p in range(x.begin + 1, x.end)})
        assert scored == predictable
        if s < w:  # overlapping windows leave no gaps
            assert scored == list(range(1, wins[-1].end))
        assert all(x.end - x.begin == w for x in wins)


def test_sliding_windows_refuses_short_text():
    with pytest.raises(ValueError, match="fewer than the window"):
        sliding_windows(100, 200, 200)


def test_aggregate_matches_direct_computation():
    wins = sliding_windows(12, 6, 3)
    nll = [[0.1 * (i + 1) + 0.01 * k for i in range(5)] for k in range(len(wins))]
    out = aggregate(wins, nll, [0, 3, 6])
    kept = [v for x, row in zip(wins, nll) for off, v in enumerate(row, 1)
            if x.begin + off >= x.score_from]
    assert out["tokens_scored"] == len(kept) == 11
    assert out["ppl"] == pytest.approx(math.exp(sum(kept) / len(kept)))
    assert sum(b["tokens"] for b in out["buckets"]) == 11


def test_default_buckets():
    assert default_bucket_edges(8192) == [0, 1024, 2048, 4096, 8192]


def test_method_overrides():
    assert method_overrides("trained", SMOL, 4) == {"max_position_embeddings": 32768}
    pi = method_overrides("pi", SMOL, 2)["rope_parameters"]
    assert pi["rope_type"] == "linear" and pi["factor"] == 2.0
    ntk = method_overrides("ntk", SMOL, 4)["rope_parameters"]
    assert ntk["rope_theta"] == pytest.approx(1e5 * 4 ** (64 / 62))
    yarn = method_overrides("yarn", SMOL, 4)
    assert yarn["rope_parameters"]["rope_type"] == "yarn"
    assert yarn["max_position_embeddings"] == 32768
    with pytest.raises(ValueError, match="unknown"):
        method_overrides("rope-magic", SMOL, 2)


def test_ntk_method_is_eq15_in_vllm_and_hf():
    """NTK-aware as a scaled base: HF's inv_freq with that base equals the paper's Eq. 15
    (theta_j' = (b s^(d/(d-2)))^(-2j/d)) computed directly."""
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS  # noqa: F401

    params = method_overrides("ntk", SMOL, 4)["rope_parameters"]
    d = 64
    direct = (1e5 * 4 ** (d / (d - 2))) ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
    cfg = LlamaConfig(hidden_size=576, num_attention_heads=9, head_dim=64,
                      rope_parameters=params)
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding
    inv = LlamaRotaryEmbedding(cfg).inv_freq
    torch.testing.assert_close(inv.double(), direct, rtol=1e-6, atol=0)


def test_passkey_prompt_is_exact_and_checkable(smol_model):
    from transformers import AutoTokenizer

    from yarn_vllm.tools.tasks.passkey import make_passkey_prompt

    tok = AutoTokenizer.from_pretrained(smol_model)
    p = make_passkey_prompt(tok, 1000, 0.5, seed=3)
    assert len(p.token_ids) == 1000
    text = tok.decode(p.token_ids)
    assert f"The pass key is {p.key}" in text
    assert text.index(p.key) > len(text) // 4
    assert p.is_found(f" {p.key}. Remember") and not p.is_found(" 12") and not p.is_found("no")
    with pytest.raises(ValueError, match="too short"):
        make_passkey_prompt(tok, 20, 0.5, seed=0)


@pytest.fixture(scope="session")
def smol_hf_ppl(smol_model):
    """HF transformers perplexity on the same windows, YaRN s=2, fp32: the reference."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from yarn_vllm.tools.eval.run import default_text

    config = AutoConfig.from_pretrained(smol_model)
    for k, v in method_overrides("yarn", config.to_dict(), 2.0).items():
        setattr(config, k, v)
    model = AutoModelForCausalLM.from_pretrained(smol_model, config=config,
                                                 dtype=torch.float32).eval()
    ids = AutoTokenizer.from_pretrained(smol_model).encode(default_text(),
                                                           add_special_tokens=False)
    out = {}
    for w in (512, 2048):
        x = torch.tensor([ids[:w]])
        with torch.no_grad():
            logits = model(x).logits[0, :-1].float()
        nll = torch.nn.functional.cross_entropy(logits, x[0, 1:])
        out[w] = math.exp(nll.item())
    return out


def test_vllm_perplexity_matches_hf(smol_model, smol_hf_ppl):
    """vLLM with the plugin against HF, both fp32, YaRN s = 2 inside the trained 8k.

    Measured: they agree to 2e-7 at 512 and 6e-7 at 2048, relative; YaRN's whole effect at
    2k is 3.5% over the model as trained (26.78 against 27.76), 350 times the tolerance, so
    even a small part of it going wrong would show."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from yarn_vllm.tools.eval.run import default_text, eval_perplexity

    rtol = 1e-4
    res = eval_perplexity(smol_model, ["yarn"], [512, 2048], factor=2.0,
                          llm_kwargs={"dtype": "float32", "enforce_eager": True})
    r = res["methods"]["yarn"]
    assert r["dtype"] == "float32"
    for w in (512, 2048):
        assert r["ppl"][str(w)]["tokens_scored"] == w - 1
        assert r["ppl"][str(w)]["ppl"] == pytest.approx(smol_hf_ppl[w], rel=rtol)
    # contrast: the model as trained (plain RoPE) at 2k, HF fp32
    model = AutoModelForCausalLM.from_pretrained(smol_model, dtype=torch.float32).eval()
    ids = AutoTokenizer.from_pretrained(smol_model).encode(default_text(),
                                                           add_special_tokens=False)
    x = torch.tensor([ids[:2048]])
    with torch.no_grad():
        nll = torch.nn.functional.cross_entropy(model(x).logits[0, :-1].float(), x[0, 1:])
    assert abs(math.exp(nll.item()) / smol_hf_ppl[2048] - 1) > 100 * rtol


# ---- tables, plots and the results suite --------------------------------------------

def _ppl_result(method, ppl_by_window, factor=2.0):
    return {"model": "/m/SmolLM2", "factor": factor, "windows": list(ppl_by_window),
            "methods": {method: {"seconds": 60.0,
                                 "ppl": {str(w): {"ppl": v} for w, v in ppl_by_window.items()}}}}


def test_tables_and_plots_mark_missing_cells(tmp_path):
    from yarn_vllm.tools.eval import report

    res = _ppl_result("yarn", {2048: 27.5, 8192: 24.1})
    res["methods"]["trained"] = {"ppl": {"2048": {"ppl": 26.8}}}
    table = report.perplexity_table(res, {"yarn": "yarn (static)"})
    assert table.splitlines()[0] == "| method | 2,048 | 8,192 |"
    assert "| yarn (static) | 27.50 | 24.10 |" in table and "| trained | 26.80 | – |" in table
    pk = {"model": "m", "factor": 4.0, "lengths": [1024, 2048], "depths": [0.5],
          "methods": {"yarn": {"grid": {"1024": {"0.5": {"found": 2, "trials": 2}}}}}}
    table = report.passkey_table(pk)
    assert table.splitlines()[0] == "| method | 1k @ 50% | 2k @ 50% | found |"
    assert "| yarn | 2/2 | – | 2/2 |" in table
    for name, r in (("perplexity", res), ("passkey", pk)):
        report.write_outputs(r, str(tmp_path), name)
        assert (tmp_path / f"{name}.png").stat().st_size > 1000
        assert json.loads((tmp_path / f"{name}.json").read_text()) == r


def test_a_method_is_one_registry_entry(monkeypatch, tmp_path):
    """A new method (as yarn-request will be) needs one METHODS entry: the overrides, the
    CLI and the suite's report all pick it up; the report shows it as not yet measured."""
    from yarn_vllm.tools import methods
    from yarn_vllm.tools.cli.args import method_names
    from yarn_vllm.tools.eval import suite

    entry = methods.Method("yarn-x (test)", lambda hf, s: methods.METHODS["yarn"].overrides(hf, s))
    monkeypatch.setitem(methods.METHODS, "yarn-x", entry)
    assert method_overrides("yarn-x", SMOL, 4) == method_overrides("yarn", SMOL, 4)
    assert method_names("trained,yarn-x") == ["trained", "yarn-x"]
    job = suite.Job("ppl-t", "ppl", (2048,), 2.0)
    suite.save(str(tmp_path), job, "yarn", _ppl_result("yarn", {2048: 27.5}))
    text = suite.report(str(tmp_path), jobs=(job,))
    assert "| yarn-x (test) | – |" in text and "| yarn (static) | 27.50 |" in text
    missing = next(line for line in text.splitlines() if line.startswith("Not yet measured"))
    assert "ppl-t/trained, ppl-t/pi, ppl-t/ntk" in missing and missing.endswith("ppl-t/yarn-x.")
    assert "ppl-t/yarn," not in missing  # measured


def test_methods_registry_serves_eval_and_bench():
    """One registry: vLLM's own layer is a method with the plugin off and yarn's settings,
    benchmarked by default but not evaluated (its quality is ours by construction)."""
    from yarn_vllm.tools.methods import METHODS, bench_methods, default_factor, eval_methods

    assert not METHODS["vllm-yarn"].plugins and all(
        m.plugins for name, m in METHODS.items() if name != "vllm-yarn")
    assert method_overrides("vllm-yarn", SMOL, 4) == method_overrides("yarn", SMOL, 4)
    assert eval_methods() == ["trained", "pi", "ntk", "yarn", "yarn-dynamic", "yarn-dynamic-h2",
                              "yarn-request"]
    assert "vllm-yarn" in bench_methods() and "pi" not in bench_methods()
    # the one default-factor rule: the smallest power of two >= 2 that holds the longest input
    assert [default_factor(8192, n) for n in (512, 16384, 16392, 32768, 40000)] == [
        2.0, 2.0, 4.0, 4.0, 8.0]


def test_suite_report_says_which_dtype_ran(tmp_path):
    from yarn_vllm.tools.eval import suite

    job = suite.Job("ppl-t", "ppl", (2048,), 2.0)
    result = _ppl_result("yarn", {2048: 27.5})
    suite.save(str(tmp_path), job, "yarn", result)
    text = suite.report(str(tmp_path), methods=["yarn"], jobs=(job,))
    assert "(one window per size, dtype not recorded)" in text and "fp32" not in text
    result["methods"]["yarn"]["dtype"] = "bfloat16"
    suite.save(str(tmp_path), job, "yarn", result)
    assert "(one window per size, bfloat16)" in suite.report(str(tmp_path), methods=["yarn"],
                                                            jobs=(job,))


def test_suite_writes_a_readme_only_when_named(tmp_path, monkeypatch, capsys):
    """`eval suite` used to rewrite whatever README.md was in the current directory."""
    from yarn_vllm.tools.cli import main
    from yarn_vllm.tools.eval import suite

    store = tmp_path / "store"
    suite.save(str(store), suite.SUITE[-1], "yarn", _ppl_result("yarn", {2048: 27.5}))
    here = tmp_path / "README.md"
    here.write_text("# someone else's project\n")
    monkeypatch.chdir(tmp_path)
    args = ["eval", "suite", "--model", "unused", "--store", str(store), "--report-only"]
    assert main(args) == 0
    assert here.read_text() == "# someone else's project\n"
    assert "| yarn (static) |" in capsys.readouterr().out
    named = tmp_path / "docs.md"
    named.write_text("# ours\n")
    assert main(args + ["--readme", str(named)]) == 0
    assert suite.RESULTS_BEGIN in named.read_text()
    assert here.read_text() == "# someone else's project\n"


def test_suite_writes_never_collide_nor_leave_partial_files(tmp_path):
    """Results, the README section and the PNGs go through unique temporary names
    (mkstemp) and an atomic replace: concurrent writers of one file do not move each
    other's temporaries (the fixed `.tmp` name did), and a failed write keeps the old file."""
    from concurrent.futures import ThreadPoolExecutor

    from yarn_vllm.tools.eval import report, suite

    readme = tmp_path / "README.md"
    readme.write_text("# r\n")
    job = suite.Job("ppl-t", "ppl", (2048,), 2.0)
    store = str(tmp_path / "store")

    def write(i):  # two suites at once (threads here: matplotlib itself is not thread-safe)
        suite.save(store, job, "yarn", _ppl_result("yarn", {2048: 20.0 + i}))
        suite.write_section(str(readme), f"section {i} " + "x" * 200000)

    with ThreadPoolExecutor(4) as pool:
        list(pool.map(write, range(32)))  # raised FileNotFoundError with a shared .tmp name
    assert suite.load(store, job, "yarn")["methods"]["yarn"]["ppl"]["2048"]["ppl"] >= 20.0
    text = readme.read_text()
    assert text.count(suite.RESULTS_BEGIN) == 1 and text.count("x" * 200000) == 1
    report.write_outputs(_ppl_result("yarn", {2048: 20.0}), str(tmp_path / "out"), "perplexity")
    png = tmp_path / "out" / "perplexity.png"
    assert png.read_bytes().startswith(b"\x89PNG") and png.read_bytes().endswith(b"IEND\xaeB`\x82")
    assert png.stat().st_mode & 0o777 == 0o666 & ~_umask()  # not mkstemp's 0600
    assert [p.name for p in tmp_path.rglob(".*")] == []  # no temporary left behind

    with pytest.raises(RuntimeError), report.replacing(str(png)) as tmp:
        open(tmp, "wb").write(b"\x89PNG half")
        raise RuntimeError("killed mid-write")
    assert png.read_bytes().endswith(b"IEND\xaeB`\x82") and not list(tmp_path.rglob(".*"))


def _umask() -> int:
    import os

    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_passkey_length_too_short_is_one_line(smol_model):
    from yarn_vllm.errors import UserError
    from yarn_vllm.tools.eval.run import eval_passkey

    with pytest.raises(UserError, match="eval passkey: `lengths` are \\[10\\]: length 10 is "
                                        "too short"):
        eval_passkey(smol_model, ["trained"], [10], [0.5], 1)


def test_suite_section_replaces_only_the_marked_block(tmp_path):
    from yarn_vllm.tools.eval import suite

    readme = tmp_path / "README.md"
    readme.write_text("# title\n\nintro\n")
    suite.write_section(str(readme), "first")
    readme.write_text(readme.read_text() + "\n## after\n")
    suite.write_section(str(readme), "second | table")
    text = readme.read_text()
    assert text.startswith("# title\n\nintro\n") and text.endswith("\n## after\n")
    assert "second | table" in text and "first" not in text
    assert text.count(suite.RESULTS_BEGIN) == 1 and text.count(suite.RESULTS_END) == 1


@pytest.mark.slow  # two real engines: minutes on 2 cores; the store/report logic has fast tests
def test_suite_runs_stores_resumes_and_writes_the_readme(smol_model, tmp_path):
    """The one command at a small size on the real model: each (job, method) is stored as
    it finishes, the README block is rewritten from the store, a second run reuses it."""
    from yarn_vllm.tools.eval import suite

    jobs = (suite.Job("ppl-small", "ppl", (512,), 2.0),
            suite.Job("passkey-small", "passkey", (1024,), 2.0, depths=(0.5,), trials=1))
    readme, store = tmp_path / "README.md", str(tmp_path / "eval")
    readme.write_text("# r\n")
    suite.run_suite(smol_model, store=store, readme=str(readme), methods=["trained"], jobs=jobs)
    ppl = suite.load(store, jobs[0], "trained")["methods"]["trained"]
    assert ppl["ppl"]["512"]["tokens_scored"] == 511 and 5 < ppl["ppl"]["512"]["ppl"] < 100
    pk = suite.load(store, jobs[1], "trained")["methods"]["trained"]
    # 1k tokens is well inside the model's trained 8k: the key must be found
    assert pk["grid"] == {"1024": {"0.5": {"found": 1, "trials": 1}}}, pk["answers"]
    text = readme.read_text()
    assert f"| trained (RoPE as trained) | {ppl['ppl']['512']['ppl']:.2f} |" in text
    assert "| trained (RoPE as trained) | 1/1 | 1/1 |" in text
    assert (tmp_path / "eval" / "passkey.png").exists() and "](eval/passkey.png)" in text
    logged = []
    suite.run_suite(smol_model, store=store, readme=str(readme), methods=["trained"], jobs=jobs,
                    log=logged.append)
    assert logged == ["ppl-small / trained: stored, reused", "passkey-small / trained: stored, reused"]
    assert readme.read_text() == text


def test_partial_result_is_shown_and_not_taken_as_done(tmp_path):
    """A reduced or interrupted run fills its cells in the report, and the suite still
    counts the job as to be run for that method."""
    from yarn_vllm.tools.eval import suite

    job = suite.Job("pk", "passkey", (8192, 16384), 4.0, depths=(0.1, 0.5), trials=1)
    part = {"model": "m", "methods": {"yarn": {"seconds": 600.0, "grid": {
        "16384": {"0.5": {"found": 1, "trials": 1}}}}}}
    suite.save(str(tmp_path), job, "yarn", part)
    assert suite.measured_cells(job, "yarn", part) == ["16384@0.5"]
    assert not suite.is_complete(str(tmp_path), job, "yarn")
    text = suite.report(str(tmp_path), methods=["yarn"], jobs=(job,))
    assert "| yarn (static) | – | – | – | 1/1 | 1/1 |" in text
    assert "| passkey 8k, 16k × 2 depths × 1 (s=4) | 10.0 min (1 of 4 cells) |" in text
    suite.save(str(tmp_path), job, "yarn", {**part, "cores": 1})  # a run pinned to one core says so
    text = suite.report(str(tmp_path), methods=["yarn"], jobs=(job,))
    assert "| 10.0 min on 1 core (1 of 4 cells) |" in text
    assert "pk/yarn (1 of 4 cells measured)" in text
