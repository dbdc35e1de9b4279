"""The CLI: the main job on the real default model, and its errors."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from yarn_vllm.tools.cli.args import passthrough_kwargs
from yarn_vllm.errors import UserError

PROMPT = "The Library of Congress held a workshop on electronic texts. The main topics were"


def run_cli(*args, timeout=900):
    return subprocess.run([sys.executable, "-m", "yarn_vllm.tools.cli", *args], capture_output=True,
                          text=True, timeout=timeout)


def test_generate_on_default_model_matches_hf(smol_model, tmp_path):
    """`yarn-vllm generate` with YaRN s=2 gives HF transformers' greedy continuation."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from yarn_vllm.tools.methods import method_overrides

    out = tmp_path / "gen.jsonl"
    proc = run_cli("generate", "--prompt", PROMPT, "--factor", "2", "--max-tokens", "16",
                   "--output", str(out), "--dtype", "float32")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "generated tok/s" in proc.stdout
    row = json.loads(out.read_text().splitlines()[0])
    assert row["output_tokens"] == 16 and row["prompt_tokens"] > 10

    config = AutoConfig.from_pretrained(smol_model)
    for k, v in method_overrides("yarn", config.to_dict(), 2.0).items():
        setattr(config, k, v)
    model = AutoModelForCausalLM.from_pretrained(smol_model, config=config,
                                                 dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(smol_model)
    ids = tok(PROMPT, return_tensors="pt").input_ids
    with torch.no_grad():
        hf = model.generate(ids, max_new_tokens=16, do_sample=False, min_new_tokens=16)
    assert row["text"] == tok.decode(hf[0, ids.shape[1]:], skip_special_tokens=True)


def test_generate_bad_yarn_setting_is_one_line(tmp_path):
    proc = run_cli("generate", "--model", str(tmp_path), "--prompt", "x", "--factor", "-1")
    assert proc.returncode == 2
    [line] = proc.stderr.strip().splitlines()
    assert line.startswith("yarn-vllm: yarn config: `factor` is -1.0. Fix: give a finite number")


def test_passthrough_kwargs():
    assert passthrough_kwargs(["--max-num-seqs", "4", "--enforce-eager", "--dtype=float32",
                               "--hf-overrides", '{"a": 1}']) == {
        "max_num_seqs": 4, "enforce_eager": True, "dtype": "float32", "hf_overrides": {"a": 1}}
    with pytest.raises(UserError, match="`stray` is an unexpected argument"):
        passthrough_kwargs(["stray"])
    with pytest.raises(UserError, match="`--hf-overrides` is not valid JSON"):
        passthrough_kwargs(["--hf-overrides", '{"a": '])


def test_serve_argv_keeps_passthrough_values():
    from yarn_vllm.tools.cli import build_parser, normalise_argv

    for argv, model in [(["serve", "m", "--port", "8000", "--factor", "2"], "m"),
                        (["serve", "--port", "8000", "--factor", "2"], "smollm2-135m")]:
        args, unknown = build_parser().parse_known_args(normalise_argv(argv))
        assert args.model == model and args.factor == 2.0
        assert unknown == ["--port", "8000"]


@pytest.mark.parametrize("value, message", [
    ("1024,0", "every value must be positive"),
    ("-5", "every value must be positive"),
    ("1k", "not a comma-separated list of integers"),
])
def test_one_list_parser_refuses_values_below_one(value, message, capsys):
    """bench and eval share one integer-list parser; both refuse 0 and negatives, in one line."""
    from yarn_vllm.tools.cli import build_parser

    for argv in (["bench", "offline", "--context-lengths", value],
                 ["eval", "ppl", "--windows", value], ["eval", "passkey", "--lengths", value]):
        with pytest.raises(SystemExit) as e:
            build_parser().parse_known_args(argv)
        [line] = capsys.readouterr().err.strip().splitlines()
        assert e.value.code == 2 and message in line and line.startswith("yarn-vllm: ")


FACTOR_FIX = "Fix: give a finite number"  # YarnConfig's own fix, whichever check refused it
# (argv, the one line's start): numbers that parse but make no sense, refused before any
# model loads or server is asked (the model path does not exist, the URL has no server)
BAD_FLAGS = [
    (["bench", "offline", "--factor", "nan"], f"bench offline: `--factor` is nan. {FACTOR_FIX}"),
    (["bench", "offline", "--factor", "-2"], f"bench offline: `--factor` is -2.0. {FACTOR_FIX}"),
    (["bench", "offline", "--factor", "0.5"], f"bench offline: `--factor` is 0.5. {FACTOR_FIX}"),
    (["bench", "offline", "--factor", "inf"], f"bench offline: `--factor` is inf. {FACTOR_FIX}"),
    (["bench", "offline", "--output-tokens", "0"], "bench offline: `--output-tokens` is 0. "
     "Fix: give a finite number above 0"),
    (["bench", "offline", "--repeats", "0"], "bench offline: `--repeats` is 0."),
    (["bench", "offline", "--timeout", "nan"], "bench offline: `--timeout` is nan."),
    (["bench", "offline", "--name", "../x"], "bench offline: `--name` is '../x', not a plain "
     "file name. Fix: give a name without a folder"),
    (["bench", "offline", "--name", "/tmp/x"], "bench offline: `--name` is '/tmp/x'"),
    (["bench", "online", "http://127.0.0.1:1", "--num-requests", "0"],
     "bench online: `--num-requests` is 0. Fix: give a finite number above 0"),
    (["bench", "online", "http://127.0.0.1:1", "--concurrency", "0"],
     "bench online: `--concurrency` is 0."),
    (["bench", "online", "http://127.0.0.1:1", "--output-tokens", "-3"],
     "bench online: `--output-tokens` is -3."),
    (["bench", "online", "http://127.0.0.1:1", "--name", "../../x"],
     "bench online: `--name` is '../../x'"),
    (["bench", "online", "http://127.0.0.1:1", "--num-requests", "x"],
     "bench online: `--num-requests` is 'x', not an int. Fix: see yarn-vllm bench online --help"),
    (["eval", "ppl", "--factor", "nan"], f"eval ppl: `--factor` is nan. {FACTOR_FIX}"),
    (["eval", "ppl", "--factor", "-1"], f"eval ppl: `--factor` is -1.0. {FACTOR_FIX}"),
    (["eval", "passkey", "--factor", "inf"], f"eval passkey: `--factor` is inf. {FACTOR_FIX}"),
    (["eval", "ppl", "--stride", "0"], "eval ppl: `--stride` is 0. Fix: give a finite number"),
    (["eval", "ppl", "--windows", "64", "--stride", "100"],
     "eval ppl: `--stride` is 100, longer than the window 64"),
    (["eval", "ppl", "--max-windows", "-1"], "eval ppl: `--max-windows` is -1. Fix: give a "
     "finite number 0 or more"),
    (["eval", "ppl", "--windows", "1"], "eval ppl: `--windows` holds 1."),
    (["eval", "passkey", "--trials", "0"], "eval passkey: `--trials` is 0."),
    (["bench", "sweep", "s.yaml", "--num-cpus", "0"], "bench sweep: `--num-cpus` is 0."),
    (["generate", "--replicas", "0"], "generate: `--replicas` is 0. Fix: give a finite number"),
    (["generate", "--max-tokens", "-1"], "generate: `--max-tokens` is -1."),
    (["generate", "--temperature", "nan"], "generate: `--temperature` is nan. Fix: give a "
     "finite number 0 or more"),
]


@pytest.mark.parametrize("argv, want", BAD_FLAGS, ids=[" ".join(a[:2] + a[-2:]) for a, _ in
                                                       BAD_FLAGS])
def test_bad_eval_and_bench_flags_are_one_line_and_exit_2(argv, want, capsys, tmp_path):
    from yarn_vllm.tools.cli import main

    if argv[1] not in ("online", "sweep"):
        k = 1 if argv[0] == "generate" else 2
        argv = argv[:k] + ["--model", str(tmp_path / "never-loaded")] + argv[k:]
    try:
        code = main(argv)
    except SystemExit as e:  # argparse's own type errors
        code = e.code
    [line] = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and line.startswith("yarn-vllm: " + want), line


def test_yarn_mode_choices_come_from_the_config_and_request_factors_pass_through():
    from yarn_vllm.tools.cli import build_parser, yarn_config_from_args
    from yarn_vllm.tools.cli.args import yarn_flags_given
    from yarn_vllm.yarn.config import MODES

    parser = build_parser()
    for mode in MODES:
        args, _ = parser.parse_known_args(["inspect", "--factor", "4", "--yarn-mode", mode])
        assert args.yarn_mode == mode
    with pytest.raises(SystemExit):
        parser.parse_known_args(["inspect", "--yarn-mode", "dynamc"])
    args, _ = parser.parse_known_args(["generate", "--factor", "4"])
    assert "request_factors" not in yarn_flags_given(args)  # not given: never reaches YarnConfig
    yarn_config_from_args(args)
    args, _ = parser.parse_known_args(["generate", "--factor", "4", "--yarn-mode", "request",
                                       "--request-factors", "1,2,4"])
    assert yarn_flags_given(args)["request_factors"] == ("--request-factors", [1.0, 2.0, 4.0])
    assert list(yarn_config_from_args(args).request_factors) == [1.0, 2.0, 4.0]
    with pytest.raises(SystemExit):
        parser.parse_known_args(["generate", "--request-factors", "1,two"])


def test_stray_argument_is_one_line():
    proc = run_cli("bench", "online", "http://127.0.0.1:1", "--bogus", "1", timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "yarn-vllm: bench online: `--bogus 1` is not an argument of this command. "
        "Fix: see yarn-vllm bench online --help"]
