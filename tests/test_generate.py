"""`yarn-vllm generate`: the main job (short and long prompt in request mode, the per-prompt
table, the as-trained check) and the progress of a prefill stepped by hand."""

from __future__ import annotations

import argparse
import io
import json
import re
import subprocess
import sys

import pytest

from yarn_vllm.tools.progress import SHM_NOTE, PrefillCost, Progress, ProgressLine, span_positions
from yarn_vllm.tools.tasks.main_job import check, first_difference, job_lengths, served_scale
from yarn_vllm.tools.tasks.passkey import PasskeyPrompt

SMOL_HF = {"max_position_embeddings": 8192, "rope_theta": 1e5, "head_dim": 64,
           "hidden_size": 576, "num_attention_heads": 9}


@pytest.fixture(scope="module")
def tiny_with_tokenizer(tmp_path_factory):
    """The tiny Llama (trained length 1024) with a byte-level BPE tokenizer of 400 tokens
    trained on the passkey text, so the main job runs on it end to end."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from yarn_vllm.tools.tasks.passkey import FILLER, INTRO, NEEDLE, QUESTION
    from yarn_vllm.tools.testing.tiny_model import make_tiny_llama

    path = make_tiny_llama(str(tmp_path_factory.mktemp("tiny_tok")))
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([INTRO, FILLER, NEEDLE.format(key="12345"), QUESTION] * 10, trainer)
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>",
                            eos_token="</s>").save_pretrained(path)
    return path


# ---- the ETA model ------------------------------------------------------------------------

def test_prefill_cost_predicts_a_prefill_whose_cost_grows_with_position():
    """Steps timed by t = a n + b (sum of positions): after two chunks the rest is exact."""
    a, b = 2e-3, 3e-7

    def seconds(spans):
        return sum(a * (y - x) + b * span_positions(x, y) for x, y in spans)

    cost = PrefillCost()
    assert cost.predict([(0, 100)]) is None and cost.rate() is None
    cost.add(seconds([(0, 256)]), [(0, 256)])
    # one step: a rate, which cannot see that later tokens cost more
    assert cost.predict([(256, 1536)]) == pytest.approx(seconds([(0, 256)]) / 256 * 1280)
    assert cost.predict([(256, 1536)]) < seconds([(256, 1536)])
    cost.add(seconds([(256, 512), (0, 128)]), [(256, 512), (0, 128)])  # two requests
    cost.add(0.5, [])  # a decode-only step is no prefill evidence
    rest = [(512, 1536), (128, 200)]
    assert cost.predict(rest) == pytest.approx(seconds(rest), rel=1e-9)
    assert cost.coefficients() == pytest.approx((a, b), rel=1e-9)
    assert span_positions(3, 6) == 3 + 4 + 5 and span_positions(5, 5) == 0


def test_prefill_cost_falls_back_to_a_rate_when_the_fit_goes_negative():
    cost = PrefillCost()
    cost.add(10.0, [(0, 100)])
    cost.add(1.0, [(100, 200)])  # later tokens cheaper: no positive b explains it
    a, b = cost.coefficients()
    assert b == 0 and a == pytest.approx(11.0 / 200)


# ---- the progress line ----------------------------------------------------------------------

def _progress(done, generated=0, finished=0, eta=30.0):
    return Progress(elapsed=12.0, prompt_done=done, prompt_total=13312, generated=generated,
                    finished=finished, requests=2, rate=250.0, eta=eta)


def test_progress_line_prints_each_prefill_step_and_the_end_when_not_a_terminal():
    out = io.StringIO()
    line = ProgressLine(out, note_shm=True)
    for p in (_progress(4096, 1), _progress(4096, 1), _progress(8191, 2), _progress(13312, 3),
              _progress(13312, 20), _progress(13312, 24, finished=2)):
        line(p)
    line.close()
    lines = out.getvalue().splitlines()
    assert lines[0] == SHM_NOTE  # said once, first
    assert len(lines) == 1 + 4  # 4096, 8191, prefill done, all done; repeats and decode skipped
    assert lines[1] == ("prefill 4,096/13,312 tokens 30% [###.........], 250 tok/s, ETA 0:30, "
                        "elapsed 0:12 | 1 generated, 0/2 done")
    assert lines[3] == ("prefill done: 13,312 prompt tokens, 250 tok/s, elapsed 0:12 | "
                        "3 generated, 0/2 done")
    assert lines[4].endswith("24 generated, 2/2 done")


def test_progress_line_counts_down_between_steps():
    assert "ETA 0:20" in ProgressLine.render(_progress(4096), since=10.0)
    assert "ETA 0:00" in ProgressLine.render(_progress(4096), since=99.0)
    assert "elapsed 0:22" in ProgressLine.render(_progress(4096), since=10.0)


# ---- the main job's settings and checks ------------------------------------------------------

def _args(**kw):
    return argparse.Namespace(**{"no_yarn": False, "yarn_mode": None, "yarn_config": None, **kw})


def test_main_job_serves_request_mode_unless_a_mode_is_chosen():
    from yarn_vllm.tools.tasks.main_job import main_job_yarn
    from yarn_vllm.yarn.config import YarnConfig

    short, long = job_lengths(8192)
    assert (short, long) == (1024, 12288)  # past 1.5x the trained length, not needlessly long
    yarn = main_job_yarn(None, _args(), 8192, long + 8)
    assert (yarn.mode, yarn.factor) == ("request", 2.0)
    assert main_job_yarn(YarnConfig(factor=4.0), _args(), 8192, long).mode == "request"
    assert main_job_yarn(YarnConfig(factor=4.0, mode="static"), _args(yarn_mode="static"),
                         8192, long).mode == "static"
    assert main_job_yarn(None, _args(no_yarn=True), 8192, long) is None


@pytest.mark.parametrize("mode, short_s, long_s", [
    ("request", 1.0, 2.0),  # the smallest of 1, 2 with s x 8192 >= prompt + max_tokens
    ("static", 2.0, 2.0),
    ("dynamic", 1.0, 1.5),  # max(1, 12288 / 8192) at the end of the prefill
])
def test_served_scale_is_the_engines_rule(mode, short_s, long_s):
    from yarn_vllm.yarn.config import YarnConfig
    from yarn_vllm.yarn.scale_policy import ScalePolicy

    hf = {**SMOL_HF, **YarnConfig(factor=2.0, mode=mode).hf_overrides(SMOL_HF)}
    policy = ScalePolicy.from_hf_config(hf)
    assert served_scale(policy, 1024, 16) == short_s
    assert served_scale(policy, 12288, 8) == long_s
    assert served_scale(None, 12288, 8) == 1.0


def test_check_compares_greedy_tokens_with_the_model_as_trained():
    short = type("P", (), {"name": "short", "length": 1024,
                           "task": PasskeyPrompt([0] * 1024, "29093", 0.5)})()
    same = check(short, 1.0, " 29093.\n", [5, 6, 7], [5, 6, 7, 8])  # vLLM stopped at EOS
    assert same["equals_as_trained"] is True and same["found"] is True
    assert same["result"].startswith("equals the model as trained (3/3 greedy tokens")
    other = check(short, 2.0, " 29094", [5, 9, 7], [5, 6, 7])
    assert other["equals_as_trained"] is False and other["found"] is False
    assert other["result"] == ("differs from the model as trained from token 2 of 3; "
                               "key 29093 missed (answered '29094')")
    assert check(short, 1.0, "x", [1], None)["equals_as_trained"] is None
    assert first_difference([1, 2], [1, 2, 3]) == 2 and first_difference([1], [1]) is None


def test_a_prompt_past_max_model_len_is_left_out_with_a_line(tiny_with_tokenizer, capsys):
    from yarn_vllm.tools.tasks.main_job import job_prompts

    args = argparse.Namespace(passkey_length=None, passkey_depths=[0.5], max_tokens=64)
    rows = job_prompts(args, tiny_with_tokenizer, 1024, None, limit=1024)  # --no-yarn
    assert [r["job"].name for r in rows] == ["short"]
    assert [len(r["prompt_token_ids"]) for r in rows] == [128]
    assert "the long prompt (1,536 tokens) is left out: vLLM refuses a prompt past " \
           "max_model_len 1,024" in capsys.readouterr().out


# ---- the main job on a real engine -------------------------------------------------------

def _greedy(model_path: str, prompt: list[int], n: int, s: float) -> tuple[list[int], list]:
    """HF transformers' greedy tokens at static YaRN scale s (plain RoPE at s = 1), fp32, and
    each step's log-softmax [vocab]."""
    import torch
    from transformers import AutoConfig, LlamaForCausalLM

    config = AutoConfig.from_pretrained(model_path)
    if s != 1.0:
        config.max_position_embeddings = int(s * config.max_position_embeddings)
        config.rope_parameters = {"rope_type": "yarn", "factor": s, "rope_theta": 10000.0,
                                  "original_max_position_embeddings": 1024}
    model = LlamaForCausalLM.from_pretrained(model_path, config=config,
                                             dtype=torch.float32).eval()
    tokens, steps = [], []
    with torch.no_grad():
        for _ in range(n):
            lp = torch.log_softmax(model(torch.tensor([prompt + tokens])).logits[0, -1], -1)
            steps.append(lp)
            tokens.append(int(lp.argmax()))
    return tokens, steps


def _long_prompt_answers(model_path: str):
    """The long prompt, and its greedy answers (HF) at s = 2 and at its neighbouring scale
    s = 1, which differ."""
    from transformers import AutoTokenizer

    from yarn_vllm.tools.tasks.main_job import LONG_MAX_TOKENS, make_job

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    long = make_job(tokenizer, 1024)[1]
    at2, steps2 = _greedy(model_path, long.task.token_ids, LONG_MAX_TOKENS, 2.0)
    at1, steps1 = _greedy(model_path, long.task.token_ids, LONG_MAX_TOKENS, 1.0)
    # no near-tie decides s = 2's answer, and s = 1 answers otherwise, far from it: the
    # engine's text tells the two scales apart
    assert all(sorted(lp.tolist())[-1] - sorted(lp.tolist())[-2] > 1e-3 for lp in steps2)
    assert at1 != at2 and tokenizer.decode(at1) != tokenizer.decode(at2)
    return long, tokenizer.decode(at2), tokenizer.decode(at1)


def _assert_short_prompt_ran_as_trained(model_path: str, text: str) -> None:
    """The short prompt's text is HF's greedy answer as trained (s = 1), which its
    neighbouring scale s = 2 would not give."""
    from transformers import AutoTokenizer

    from yarn_vllm.tools.tasks.main_job import SHORT_MAX_TOKENS, make_job

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    short = make_job(tokenizer, 1024)[0]
    at1, _ = _greedy(model_path, short.task.token_ids, SHORT_MAX_TOKENS, 1.0)
    at2, _ = _greedy(model_path, short.task.token_ids, SHORT_MAX_TOKENS, 2.0)
    assert text == tokenizer.decode(at1) != tokenizer.decode(at2)


def test_main_job_on_the_tiny_llama(tiny_with_tokenizer, tmp_path):
    """Request mode serves the short prompt at s=1 (equal to HF as trained) and the long one
    at s=2: its text is HF's greedy answer at s = 2, not at s = 1, and the table says
    found or missed as that answer does; the prefill, split into 256-token chunks, reports
    progress after every chunk."""
    out = tmp_path / "gen.jsonl"
    proc = subprocess.run([sys.executable, "-m", "yarn_vllm.tools.cli", "generate", "--model",
                           tiny_with_tokenizer, "--output", str(out), "--dtype", "float32",
                           "--max-num-batched-tokens", "256"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["name"], r["prompt_tokens"], r["yarn_scale"]) for r in rows] == [
        ("short", 128, 1.0), ("long", 1536, 2.0)]
    assert rows[0]["equals_as_trained"] is True and rows[0]["output_tokens"] == 16
    _assert_short_prompt_ran_as_trained(tiny_with_tokenizer, rows[0]["text"])
    assert "dtype float32, as --dtype asked" in proc.stdout
    assert re.search(r"short +128 +s=1 +equals the model as trained \(16/16", proc.stdout)
    long, text_at2, text_at1 = _long_prompt_answers(tiny_with_tokenizer)
    assert rows[1]["text"] == text_at2 != text_at1  # what the engine ran: s = 2
    found = long.task.is_found(text_at2)
    assert rows[1]["found"] is found and rows[1]["key"] == long.task.key
    result = f"key {long.task.key} {'found' if found else 'missed'}"
    if not found:
        result += f" (answered {text_at2.strip()[:20]!r})"
    assert re.search(r"long +1,536 +s=2 +" + re.escape(result) + "$", proc.stdout, re.M)

    counts = [int(m.group(1).replace(",", "")) for m in
              re.finditer(r"prefill ([\d,]+)/1,664 tokens", proc.stderr)]
    assert len(counts) >= 1664 // 256 and counts == sorted(counts) and counts[-1] < 1664
    assert "prefill done: 1,664 prompt tokens" in proc.stderr
    assert SHM_NOTE not in proc.stderr  # the engine core ran in this process


@pytest.mark.slow
def test_main_job_on_smollm2(smol_model, tmp_path):
    """README command 1's main job: 1,024 tokens at s=1 equal to the model as trained, 12,288
    tokens (1.5x the trained 8,192) at s=2 finding its key."""
    import time

    out = tmp_path / "gen.jsonl"
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "yarn_vllm.tools.cli", "generate", "--output",
                           str(out)], capture_output=True, text=True, timeout=1200)
    wall = time.perf_counter() - t0
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["name"], r["prompt_tokens"], r["yarn_scale"]) for r in rows] == [
        ("short", 1024, 1.0), ("long", 12288, 2.0)], wall
    assert rows[0]["equals_as_trained"] is True, rows[0]
    assert all(r["found"] for r in rows), rows
    print(f"main job wall time {wall:.0f} s")
