"""Dynamic YaRN as vLLM's scheduler really runs it: staggered arrivals, short prompts, preemption.

Two engines (a random tiny Llama trained to L = 1024, dynamic mode, fp32), stepped by hand
(tests/stepped_engine_worker.py), started side by side.

`stepped`: chunked prefill and prefix caching off, a KV cache of 68 usable blocks of 32
tokens (69, one held back by vLLM as its null block):

  step 0  A, 1000 tokens + 40 new: crosses L at its 25th new token;
  step 3  B, 40 tokens + 20 new, while A decodes: its prompt (on the kernel's query-row
          tiles) and A's decode (on its key-split loop) in one call of the C++ kernel;
  step 6  D, 24 tokens + 8 new, and C, 1050 tokens + 30 new, while A and B decode: both
          prompts and both decodes in one call. The cache is then full: C is preempted
          when it needs another block (at its 7th new token), and resumed, beside A's and
          B's decodes, once D has finished.

Recompute semantics (what vLLM does, and what the reference loop replays): a preempted
sequence loses its KV cache; when it is scheduled again, its prompt and the k tokens it
had generated are prefilled in one step at the scale of that whole length,
s = max(1, (P + k) / L), exactly as a fresh prompt of P + k tokens would be. Its keys and
values at layers >= 1 are therefore those of one forward at s(P + k), not the ones the
uninterrupted sequence built step by step, and its later tokens follow from those.

Chunked prefill and prefix caching are pinned off there, so that a recompute is that one
whole step. The model's rope_parameters carry an explicit attention_factor (1.25): in dynamic
mode it applies only while s > 1 (A's first 24 tokens run as trained, then at 1.25^2).

`cached`: chunked prefill (256-token budget) and prefix caching on, Eq. 22's magnitude,
80 usable blocks of 32:

  step 0  A, 1000 tokens + 40 new, prefilled in four chunks at s(P) = 1, crossing L at its
          25th new token;
  step 3  C, 1500 tokens + 24 new: its prompt in six chunks, each beside A's decode, every
          chunk at s(P) = 1500 / L; C is preempted when A needs another block;
  step 29 E, 300 tokens + 30 new (s = 1), queued behind C. Once A finishes, C resumes: its
          blocks are still in the prefix cache (hit past its prompt, 1,504 tokens), so only
          its last tokens are recomputed, at s(P + k), in the step that runs E's first chunk.

Every step of every request is compared with `dynamic_reference.replay`, which recomputes
exactly the positions the engine's scheduler ran in each step and keeps the rest.
"""

from __future__ import annotations

import dataclasses
import json
import os

import pytest
import torch

from dynamic_reference import (CONTRAST, NEIGHBOUR, PaperDynamicYarn, assert_follows, generate,
                               logprob_gap, replay, rope_of)
from stepped_engine_worker import MODULE, stepped_env
from yarn_vllm.yarn.config import YarnConfig
from yarn_vllm.tools.engine_worker import run_worker

L = 1024
# id: (prompt tokens, new tokens, the step it arrives at)
# (in this order: vLLM preempts the request it took last, which must be C)
REQUESTS = {"A": (1000, 40, 0), "B": (40, 20, 3), "D": (24, 8, 6), "C": (1050, 30, 6)}
BLOCK, BLOCKS, MAX_LEN = 32, 69, 1152


# the `cached` engine's requests, and its cache
CACHED = {"A": (1000, 40, 0), "C": (1500, 24, 3), "E": (300, 30, 29)}
CACHED_BLOCKS, CACHED_BUDGET, CACHED_LEN = 81, 256, 2048


def _spec(tiny_llama, hf, overrides, requests, seed, **llm_kwargs):
    g = torch.Generator().manual_seed(seed)
    prompts = {name: torch.randint(2, hf["vocab_size"], (n,), generator=g).tolist()
               for name, (n, _, _) in requests.items()}
    spec = {"model": tiny_llama,
            "requests": [{"id": name, "prompt_token_ids": prompts[name], "arrive_step": at,
                          "sampling": {"max_tokens": new}}
                         for name, (_, new, at) in requests.items()],
            # fp32 forced: on a CPU with bf16 (AMX) vLLM would pick bf16 from "auto"
            "llm_kwargs": {"dtype": "float32", "hf_overrides": overrides,
                           "skip_tokenizer_init": True, "block_size": BLOCK,
                           "disable_log_stats": False,  # vLLM counts preemptions only then
                           **llm_kwargs},
            "sampling": {"logprobs": 5, "detokenize": False}}
    return prompts, spec


@pytest.fixture(scope="session")
def engines(tiny_llama):
    """Both engines of the module docstring, side by side."""
    from concurrent.futures import ThreadPoolExecutor

    hf = json.load(open(os.path.join(tiny_llama, "config.json")))
    factor_125 = YarnConfig(factor=4.0, mode="dynamic", attention_factor=1.25).hf_overrides(hf)
    eq22 = YarnConfig(factor=4.0, mode="dynamic").hf_overrides(hf)
    runs = {
        # pinned: each prefill, and each recompute, is one whole step
        "stepped": (factor_125, _spec(tiny_llama, hf, factor_125, REQUESTS, 5,
                                      max_model_len=MAX_LEN, num_gpu_blocks_override=BLOCKS,
                                      enable_chunked_prefill=False,
                                      enable_prefix_caching=False,
                                      max_num_batched_tokens=MAX_LEN)),
        "cached": (eq22, _spec(tiny_llama, hf, eq22, CACHED, 5, max_model_len=CACHED_LEN,
                               num_gpu_blocks_override=CACHED_BLOCKS,
                               enable_chunked_prefill=True, enable_prefix_caching=True,
                               max_num_batched_tokens=CACHED_BUDGET))}
    with ThreadPoolExecutor(2) as pool:
        futures = {name: pool.submit(run_worker, MODULE, spec, env=stepped_env(), timeout=900)
                   for name, (_, (_, spec)) in runs.items()}
        return {name: {"prompts": runs[name][1][0], "rope": rope_of({**hf, **runs[name][0]}),
                       "result": future.result()} for name, future in futures.items()}


@pytest.fixture(scope="session")
def stepped(engines):
    return engines["stepped"]


@pytest.fixture(scope="session")
def cached(engines):
    return engines["cached"]


@pytest.fixture(scope="session")
def hf_model(tiny_llama):
    from transformers import LlamaForCausalLM

    return LlamaForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()


def _schedule(stepped):
    """Per step: {request name: tokens scheduled}, and the names preempted in that step."""
    return [({_name(r): n for r, n in s["scheduled"].items()}, [_name(r) for r in s["preempted"]])
            for s in stepped["result"]["steps"]]


def _name(request_id: str) -> str:
    return request_id.split("-")[0]  # vLLM suffixes the ids it is given


def _recomputes(stepped, request: str) -> list[int]:
    """The k (tokens generated so far) at each recomputed prefill of `request`."""
    prompt_len = REQUESTS[request][0]
    prefills = [n for scheduled, _ in _schedule(stepped) if (n := scheduled.get(request, 0)) > 1]
    assert prefills[0] == prompt_len
    return [n - prompt_len for n in prefills[1:]]


def _replay(stepped, hf_model, request: str, rope=None, steps: int | None = None):
    ours = stepped["result"]["outputs"][request]
    n = steps or len(ours["token_ids"])
    _, logprobs = generate(hf_model, stepped["prompts"][request], n, rope or stepped["rope"],
                           recompute_at=_recomputes(stepped, request), forced=ours["token_ids"])
    return ours, logprobs


def test_the_scheduler_ran_the_scenario(stepped):
    """Guards the scenario itself: vLLM really interleaved, preempted and resumed as planned."""
    result = stepped["result"]
    assert result["attention_backends"] == [
        "yarn_vllm.attention.backend.YarnDynamicAttentionBackend"]
    assert result["dtype"] == "float32" and result["chunked_prefill"] is False
    schedule = _schedule(stepped)
    # B arrives while A decodes: one kernel call runs B's rows on the query-row tiles and
    # A's on the key-split decode loop
    assert schedule[3][0] == {"A": 1, "B": 40}
    assert schedule[6][0] == {"A": 1, "B": 1, "D": 24, "C": 1050}  # decodes beside prefills
    preempted = [name for _, names in schedule for name in names]
    assert preempted == ["C"] and result["num_preemptions"] == 1
    (k,) = _recomputes(stepped, "C")
    assert 0 < k < REQUESTS["C"][1] and (REQUESTS["C"][0] + k) / L > 1
    resumed = next(s for s, _ in schedule if s.get("C", 0) > 1 and s["C"] != 1050)
    assert resumed.get("A") == 1  # the recompute ran beside a decode
    for name, (_, new, _) in REQUESTS.items():
        assert len(result["outputs"][name]["token_ids"]) == new


def test_crossing_the_trained_length_while_others_arrive(stepped, hf_model):
    ours, logprobs = _replay(stepped, hf_model, "A")
    assert_follows(ours, logprobs)
    # A few steps past L, the neighbouring scale (s(l) + 1/32), decoding at the prompt's
    # scale (s(P) = 1 throughout), or Eq. 22's magnitude in place of the configured
    # attention_factor, is far outside the tolerance.
    past = L - REQUESTS["A"][0] + 4
    for wrong in ({"scale_offset": NEIGHBOUR}, {"fixed_scale": 1.0}, {"attention_factor": None}):
        _, contrast = _replay(stepped, hf_model, "A",
                              dataclasses.replace(stepped["rope"], **wrong), steps=past)
        assert logprob_gap(ours, contrast) > CONTRAST, wrong


@pytest.mark.parametrize("request_id", ["B", "D"])
def test_a_short_prompt_arriving_mid_decode_runs_as_trained(stepped, hf_model, request_id):
    """B and D never pass L: plain RoPE, attention scale 1, whatever attention_factor says.
    One HF forward over the prompt and the engine's tokens is the model as trained."""
    prompt, ours = stepped["prompts"][request_id], stepped["result"]["outputs"][request_id]
    with torch.no_grad():
        logits = hf_model(torch.tensor([prompt + ours["token_ids"]])).logits[0].float()
    assert_follows(ours, list(torch.log_softmax(logits[len(prompt) - 1:-1], -1)))
    _, above = _replay(stepped, hf_model, request_id,
                       dataclasses.replace(stepped["rope"], fixed_scale=1 + NEIGHBOUR), steps=1)
    assert logprob_gap(ours, above) > CONTRAST  # the neighbouring scale 1 + 1/32 would not pass


def test_a_preempted_sequence_is_recomputed_at_its_whole_length(stepped, hf_model):
    ours, logprobs = _replay(stepped, hf_model, "C")
    assert_follows(ours, logprobs)
    # Contrasts: had the cache survived the preemption (swapped out, not recomputed), or had
    # the recompute run at the prompt's scale s(P) rather than s(P + k), the token after the
    # resume would be far off.
    (k,) = _recomputes(stepped, "C")
    prompt = stepped["prompts"]["C"]
    _, kept = generate(hf_model, prompt, k + 1, stepped["rope"], forced=ours["token_ids"])
    assert logprob_gap(ours, kept) > CONTRAST
    _, above = _replay(stepped, hf_model, "C",  # and the neighbouring scale, s(l) + 1/32
                       dataclasses.replace(stepped["rope"], scale_offset=NEIGHBOUR), steps=k + 1)
    assert logprob_gap(ours, above) > CONTRAST
    at_prompt = _ScaleOfPromptAt(**vars(stepped["rope"]), recompute_length=len(prompt) + k)
    _, stale = generate(hf_model, prompt, k + 1, at_prompt, recompute_at=[k],
                        forced=ours["token_ids"])
    assert logprob_gap(ours, stale) > CONTRAST


@dataclasses.dataclass(frozen=True)
class _ScaleOfPromptAt(PaperDynamicYarn):
    """The paper's rule, except that the step of `recompute_length` runs at s(prompt)."""

    recompute_length: int = 0

    def scale(self, length: int) -> float:
        if length == self.recompute_length:
            return super().scale(REQUESTS["C"][0])
        return super().scale(length)


# ---- the `cached` engine: chunked prefill and prefix caching on ------------------------------

def _spans(run, request: str) -> list[tuple[int, int]]:
    """The positions [start, stop) the engine computed for `request`, step by step."""
    return [(s["computed"][request], s["computed"][request] + s["scheduled"][request])
            for s in run["result"]["steps"] if request in s["scheduled"]]


def _replay_spans(run, hf_model, request: str, rope=None, chunk_scale=None):
    ours = run["result"]["outputs"][request]
    return ours, replay(hf_model, run["prompts"][request], ours["token_ids"],
                        _spans(run, request), rope or run["rope"], chunk_scale)


def test_the_cached_scenario_ran_as_planned(cached):
    """Guards the scenario: chunked prefill beside decodes, one preemption of C, C's resume
    from the prefix cache with a short recompute beside E's first chunk (E at s = 1)."""
    result = cached["result"]
    assert result["chunked_prefill"] is True and result["prefix_caching"] is True
    assert result["dtype"] == "float32"
    steps = result["steps"]
    preempted = [name for s in steps for name in s["preempted"]]
    assert preempted == ["C"] and result["num_preemptions"] == 1
    P = CACHED["C"][0]
    spans = _spans(cached, "C")
    chunks = [(a, b) for a, b in spans if b <= P]
    assert len(chunks) >= 5 and chunks[0][0] == 0 and chunks[-1][1] == P  # chunked at s(P)
    beside = [s["scheduled"].get("A") for s in steps
              if s["scheduled"].get("C", 0) > 1 and s["computed"]["C"] < P]
    assert len(beside) == len(chunks) and beside[1:] == [1] * (len(chunks) - 1)  # A's decode
    resumes = [(a, b) for (a, b), (_, prev) in zip(spans[1:], spans) if a < prev]
    assert len(resumes) == 1
    start, stop = resumes[0]
    assert P < start < stop - 1  # a prefix hit past the prompt, then a recompute of the rest
    k = stop - P - 1  # tokens C had when it resumed, the last one recomputed
    assert 0 < k < CACHED["C"][1] and stop / L > P / L > 1
    resumed = next(s for s in steps if s["scheduled"].get("C") == stop - start
                   and s["computed"]["C"] == start)
    assert resumed["scheduled"].get("E", 0) > 1  # E's prefill (s = 1) in the same step
    for name, (_, new, _) in CACHED.items():
        assert len(result["outputs"][name]["token_ids"]) == new


@pytest.mark.parametrize("request_id", ["A", "C", "E"])
def test_every_step_of_a_chunked_cached_run_follows_the_reference(cached, hf_model, request_id):
    """Every token's logprob, the recompute after C's preemption included, against the
    pre-RoPE reference replaying the engine's own chunks, cache hits and recompute."""
    ours, logprobs = _replay_spans(cached, hf_model, request_id)
    assert_follows(ours, logprobs)


def test_the_neighbouring_scales_and_rules_are_far_off(cached, hf_model):
    """Contrasts for the test above: each a plausible bug, each far outside the tolerance."""
    rope = cached["rope"]
    wrong = {  # request: [(what, rope, chunk_scale)]
        "C": [("neighbour s + 1/32", dataclasses.replace(rope, scale_offset=NEIGHBOUR), None),
              ("neighbour s - 1/32", dataclasses.replace(rope, scale_offset=-NEIGHBOUR), None),
              ("prefill chunks at s(l), not s(P)", rope, lambda stop, p: rope.scale(stop)),
              ("decode at s(P), not s(l)", rope, lambda stop, p: rope.scale(p)),
              ("truncate dropped", dataclasses.replace(rope, truncate=False), None)],
        "A": [("neighbour s + 1/32", dataclasses.replace(rope, scale_offset=NEIGHBOUR), None),
              ("decode at s(P) = 1, not s(l)", rope, lambda stop, p: rope.scale(p))],
        "E": [("neighbour 1 + 1/32", dataclasses.replace(rope, fixed_scale=1 + NEIGHBOUR),
               None)]}
    for request, cases in wrong.items():
        for what, other, chunk_scale in cases:
            ours, logprobs = _replay_spans(cached, hf_model, request, other, chunk_scale)
            assert logprob_gap(ours, logprobs) > CONTRAST, (request, what)
    # C's resume without the prefix hit (everything recomputed at s(P + k)) is far off too
    ours = cached["result"]["outputs"]["C"]
    spans = _spans(cached, "C")
    full = [(0 if a < prev else a, b) for (a, b), (_, prev) in zip(spans, [(0, 0)] + spans)]
    assert full != spans
    logprobs = replay(hf_model, cached["prompts"]["C"], ours["token_ids"], full, rope)
    assert logprob_gap(ours, logprobs) > CONTRAST
