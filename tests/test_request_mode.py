"""Request mode's pieces without an engine: the choice at admission (bounded and
open-ended), escalation, the per-request override, the runner's scale rows, and the rotary layer's per-token rows
against the fp32 reference."""

from __future__ import annotations

import json
import math
import os
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from conftest import TOL
from yarn_vllm.yarn import yarn_math
from yarn_vllm.yarn.config import YarnConfig
from yarn_vllm.errors import UserError
from yarn_vllm.ops import rotary_reference
from yarn_vllm.vllm_seam.admission import admit
from yarn_vllm.vllm_seam.request_scales import RequestScaleFeeder
from yarn_vllm.yarn.scale_policy import ScalePolicy

L = 1024


def policy(factor=4.0, listed=None):
    return ScalePolicy(YarnConfig(factor=factor, original_max_position=L, mode="request",
                                  request_factors=listed), 64, 10000.0)


@pytest.mark.parametrize("prompt,max_tokens,expected", [
    # a request with max_tokens M feeds positions up to P + M - 2: s x L >= P + M - 1
    (300, 8, 1.0), (1000, 25, 1.0), (1017, 8, 1.0), (1000, 26, 2.0), (1018, 8, 2.0),
    (2041, 8, 2.0), (2042, 8, 4.0), (4000, 96, 4.0), (9000, 8, 4.0)])  # past all: the largest
def test_admission_holds_the_positions_a_bounded_request_feeds(prompt, max_tokens, expected):
    assert policy().admission_factor(prompt, max_tokens) == expected


@pytest.mark.parametrize("prompt,reserve,expected", [
    (300, 512, 1.0), (512, 512, 1.0), (513, 512, 2.0), (1024, 0, 1.0), (1025, 0, 2.0),
    (1600, 512, 4.0), (1536, 512, 2.0)])
def test_open_ended_requests_get_room_for_the_reserve(prompt, reserve, expected):
    p = ScalePolicy(YarnConfig(factor=4.0, original_max_position=L, mode="request",
                               request_reserve=reserve), 64, 10000.0)
    assert p.admission_factor(prompt, None) == expected
    # the contrast: the same prompt with a small max_tokens is admitted by its own length
    assert p.admission_factor(prompt, 1) == (1.0 if prompt <= L else 2.0)


@pytest.mark.parametrize("s,num_tokens,reserve,expected", [
    # the token at index p is produced at the smallest s with s x L >= p (reserve 0)
    (1.0, 1024, 0, None), (1.0, 1025, 0, 2.0), (2.0, 2048, 0, None), (2.0, 2049, 0, 4.0),
    (1.0, 1025, 512, 2.0), (1.0, 1025, 1500, 4.0), (3.0, 3073, 0, 4.0),
    (4.0, 4097, 0, None),  # nothing larger on offer
    (1.0, 4000, 512, 4.0)])  # nothing covers 4512: the largest
def test_escalation_moves_to_the_next_scale_that_holds_the_position(s, num_tokens, reserve,
                                                                     expected):
    p = ScalePolicy(YarnConfig(factor=4.0, original_max_position=L, mode="request",
                               request_reserve=reserve), 64, 10000.0)
    assert p.escalation_factor(s, num_tokens) == expected


def test_escalation_off_keeps_the_scale():
    p = ScalePolicy(YarnConfig(factor=4.0, original_max_position=L, mode="request",
                               request_escalate=False), 64, 10000.0)
    assert p.escalation_factor(1.0, 3000) is None


def test_listed_scales_and_the_factor_6_default():
    assert policy(6.0).scales_on_offer() == (1.0, 2.0, 4.0, 6.0)
    assert policy(6.0).admission_factor(4500, 1) == 6.0
    assert policy(8.0, listed=(1.0, 3.0, 8.0)).admission_factor(2000, 1) == 3.0


@pytest.mark.parametrize("listed", [(1.0, 2.0), (1.0, 2.0, 3.0)])
def test_listed_scales_must_reach_factor(listed):
    with pytest.raises(UserError, match=r"`request_factors` are .*ending at .* where factor is 4"):
        policy(4.0, listed=listed)


@pytest.mark.parametrize("value", [1, 1.0, 2.5, 3.999, 4, np.float32(2.5), np.int64(3),
                                   np.float64(1.5)])
def test_override_takes_any_finite_scale_in_range(value):
    assert policy().admission_factor(10, 10, override=value) == float(value)


@pytest.mark.parametrize("value", [0.5, 0, -1, 4.01, float("nan"), float("inf"), "2", True,
                                   False, np.bool_(True), [2], {"s": 2}])
def test_bad_override_names_yarn_factor(value):
    with pytest.raises(UserError, match="`yarn_factor`.*Fix: give a number from 1 to 4"):
        policy().admission_factor(10, 10, override=value)


def _request(prompt_len, max_tokens, extra=None, salt=None):
    params = SimpleNamespace(max_tokens=max_tokens, extra_args=extra)
    return SimpleNamespace(prompt_token_ids=[i % 500 for i in range(prompt_len)], prompt_embeds=None,
                           sampling_params=params, cache_salt=salt)


def _processor(tiny_llama, mode="request"):
    from vllm.engine.arg_utils import EngineArgs

    hf = json.load(open(os.path.join(tiny_llama, "config.json")))
    overrides = YarnConfig(factor=4.0, mode=mode).hf_overrides(hf)
    config = EngineArgs(model=tiny_llama, hf_overrides=overrides, skip_tokenizer_init=True,
                        max_model_len=4096).create_engine_config()
    return SimpleNamespace(vllm_config=config)


def _admit(processor, request, max_tokens_in="same", **kwargs):
    """admit() as the plugin calls it: with the caller's params before vLLM filled them."""
    given = request.sampling_params.max_tokens if max_tokens_in == "same" else max_tokens_in
    admit(processor, request, SimpleNamespace(max_tokens=given), **kwargs)


def test_admit_writes_the_scale_and_leaves_the_salt_to_the_client(tiny_llama):
    import yarn_vllm

    yarn_vllm.register()
    processor = _processor(tiny_llama)
    short, long_, own = (_request(300, 8), _request(2500, 8, salt="tenant-a"),
                         _request(300, 8, extra={"yarn_factor": 3, "other": 1}))
    for r in (short, long_, own):
        _admit(processor, r)
    assert short.sampling_params.extra_args == {"yarn_factor": 1.0}
    assert long_.sampling_params.extra_args["yarn_factor"] == 4.0
    assert own.sampling_params.extra_args == {"yarn_factor": 3.0, "other": 1}
    # the scale keys the blocks in the engine core (vllm_seam.scheduler), never the salt
    assert (short.cache_salt, long_.cache_salt, own.cache_salt) == (None, "tenant-a", None)
    with pytest.raises(UserError, match="yarn_factor"):
        _admit(processor, _request(10, 10, extra={"yarn_factor": 9}))
    with pytest.raises(UserError, match="`resumable` is set in yarn_mode 'request'"):
        _admit(processor, _request(10, 10), resumable=True)


def test_admit_reads_max_tokens_from_the_callers_params(tiny_llama):
    """vLLM fills an unset max_tokens with max_model_len - prompt before admission sees the
    request; open-endedness is read from what the caller sent. The mutant that reads the
    filled-in value (4096 - 300) would admit at 4; one that ignores max_tokens would admit
    the bounded 1,000 + 100 request at 1."""
    processor = _processor(tiny_llama)
    open_ended, bounded = _request(300, 4096 - 300), _request(1000, 100)
    _admit(processor, open_ended, max_tokens_in=None)
    _admit(processor, bounded)
    assert open_ended.sampling_params.extra_args["yarn_factor"] == 1.0  # 300 + 512 <= 1024
    assert bounded.sampling_params.extra_args["yarn_factor"] == 2.0  # 1000 + 99 > 1024
    marked = _request(300, 4096 - 300)
    admit(processor, marked, SimpleNamespace(max_tokens=4096 - 300, _yarn_vllm_open_ended=True))
    assert marked.sampling_params.extra_args["yarn_factor"] == 1.0


def test_admission_errors_are_vllms_client_errors(tiny_llama):
    """vLLM answers only its own validation error with 400; anything else is a 500."""
    from vllm.exceptions import VLLMValidationError

    processor = _processor(tiny_llama)
    with pytest.raises(VLLMValidationError, match="`yarn_factor` is 9"):
        _admit(processor, _request(10, 10, extra={"yarn_factor": 9}))


def test_admit_leaves_static_mode_alone(tiny_llama):
    processor = _processor(tiny_llama, mode="static")
    r = _request(500, 8, extra={"yarn_factor": "anything"}, salt="s")
    _admit(processor, r)
    assert r.sampling_params.extra_args == {"yarn_factor": "anything"} and r.cache_salt == "s"


@pytest.mark.parametrize("mode", ["static", "request", "dynamic"])
def test_token_ids_outside_the_vocabulary_are_refused_in_every_mode(tiny_llama, mode):
    """vLLM only checks ids against a tokenizer; without one an id of 2504 for a 512-word
    vocabulary killed the engine core (seen through the server)."""
    processor = _processor(tiny_llama, mode=mode)
    r = _request(10, 8)
    r.prompt_token_ids[3] = 2504
    with pytest.raises(UserError, match="`prompt` holds token id 2504.*0 to 511"):
        _admit(processor, r)
    r.prompt_token_ids[3] = -1
    with pytest.raises(UserError, match="token id -1"):
        _admit(processor, r)


# ---- the model runner's side -----------------------------------------------------------

@pytest.fixture
def request_layer(tiny_llama):
    """A real request-mode rotary layer, built under the engine config vLLM would give it."""
    from vllm.config import set_current_vllm_config

    import yarn_vllm
    from yarn_vllm.vllm_seam.rotary import YarnRotaryEmbedding

    yarn_vllm.register()
    config = _processor(tiny_llama).vllm_config
    with set_current_vllm_config(config):
        layer = YarnRotaryEmbedding(64, 64, L, 10000.0, True, 4.0, torch.float32)
    return layer, config


def _step(scales: dict, order: list, tokens: list):
    from yarn_vllm.vllm_seam.step import StepBatch

    return StepBatch(order, np.array(tokens), np.zeros(len(order), dtype=np.int64), scales)


def test_feeder_writes_each_tokens_row_and_reuses_spare_rows(request_layer):
    layer, config = request_layer
    listed = (1.0, 2.0, 4.0)
    assert layer.inv_freq.shape == (3 + config.scheduler_config.max_num_seqs, 32)
    feeder = RequestScaleFeeder([layer])
    scales = {"a": 1.0, "b": 4.0, "c": 3.0, "d": 2.0}
    feeder.write(_step(scales, ["b", "a", "c", "d"], [3, 1, 2, 2]))
    rows = layer.scale_index[:8].tolist()
    assert rows[:4] == [2, 2, 2, 0] and rows[6:] == [1, 1]
    assert rows[4] == rows[5] >= len(listed)  # the override's own spare row
    torch.testing.assert_close(layer.inv_freq[rows[4]],
                               yarn_math.yarn_inv_freq(64, 10000.0, 3.0, L), rtol=0, atol=0)
    assert layer.mscales[rows[4]].item() == pytest.approx(0.1 * math.log(3.0) + 1.0)
    # rows of the listed scales: s = 1 is plain RoPE at magnitude 1
    assert torch.equal(layer.inv_freq[0], yarn_math.rope_inv_freq(64, 10000.0))
    assert layer.mscales[0].item() == 1.0
    # a new override takes a spare row, never one the batch still needs
    feeder.write(_step({"e": 2.5, "b": 4.0}, ["e", "b"], [1, 1]))
    e_row = layer.scale_index[0].item()
    assert e_row >= len(listed) and e_row != rows[4] or feeder.row_of.get(3.0) is None
    assert layer.scale_index[1].item() == 2


def test_feeder_refuses_a_request_without_a_scale(request_layer):
    layer, _ = request_layer
    with pytest.raises(RuntimeError, match="request x is in the model runner's batch without"):
        RequestScaleFeeder([layer]).write(_step({"a": 1.0}, ["a", "x"], [1, 1]))


def test_feeder_never_evicts_a_row_the_batch_needs(request_layer):
    layer, config = request_layer
    feeder = RequestScaleFeeder([layer])
    spare = layer.inv_freq.shape[0] - 3
    factors = [1.0 + (i + 1) / (spare + 2) for i in range(spare)]  # fills every spare row
    ids = [f"r{i}" for i in range(spare)]
    feeder.write(_step(dict(zip(ids, factors)), ids, [1] * spare))
    assert len(set(layer.scale_index[:spare].tolist())) == spare
    for i, f in enumerate(factors):
        torch.testing.assert_close(layer.inv_freq[layer.scale_index[i]],
                                   yarn_math.yarn_inv_freq(64, 10000.0, f, L), rtol=0, atol=0)


def test_request_layer_rotates_each_token_at_its_rows_scale(request_layer):
    """Tokens of three requests at s = 1, 4 and 3 in one forward, against the fp32 reference
    at each token's own scale (plain RoPE at s = 1)."""
    layer, _ = request_layer
    feeder = RequestScaleFeeder([layer])
    lens = [5, 7, 4]
    feeder.write(_step({"a": 1.0, "b": 4.0, "c": 3.0}, ["a", "b", "c"], lens))
    g = torch.Generator().manual_seed(0)
    positions = torch.cat([torch.arange(290, 295), torch.arange(2400, 2407),
                           torch.arange(0, 4)])
    q = torch.randn(16, 4 * 64, generator=g)
    k = torch.randn(16, 2 * 64, generator=g)
    q_out, k_out = layer.forward_native(positions, q.clone(), k.clone())
    starts = np.cumsum([0] + lens)
    for (a, b), s in zip(zip(starts[:-1], starts[1:]), [1.0, 4.0, 3.0]):
        inv = (yarn_math.rope_inv_freq(64, 10000.0) if s == 1.0
               else yarn_math.yarn_inv_freq(64, 10000.0, s, L))
        m = 1.0 if s == 1.0 else 0.1 * math.log(s) + 1.0
        for x, out, heads in ((q, q_out, 4), (k, k_out, 2)):
            ref = rotary_reference(x[a:b].view(-1, heads, 64), positions[a:b], inv, m)
            torch.testing.assert_close(out[a:b].view(-1, heads, 64), ref, **TOL[torch.float32])
    # the contrast: token 5 rotated at s = 1 instead of its s = 4 is far off
    wrong = rotary_reference(q[5:6].view(1, 4, 64), positions[5:6],
                             yarn_math.rope_inv_freq(64, 10000.0), 1.0)
    assert (q_out[5:6].view(1, 4, 64) - wrong).abs().max() > 0.1


def test_a_request_that_skipped_admission_is_refused_in_the_engine_core():
    """No silently recomputed scale: a request without admission's scale is a loud error."""
    from yarn_vllm.vllm_seam.scheduler import _ScaleMixin

    scheduler = SimpleNamespace(yarn_policy=policy())
    skipped = SimpleNamespace(request_id="r1", num_tokens=300, num_prompt_tokens=300,
                              sampling_params=SimpleNamespace(extra_args={"other": 1}))
    with pytest.raises(RuntimeError, match="r1 reached the engine core without a YaRN scale"):
        _ScaleMixin._initial_scale(scheduler, skipped)
    admitted = SimpleNamespace(request_id="r2", num_tokens=300, num_prompt_tokens=300,
                               sampling_params=SimpleNamespace(extra_args={"yarn_factor": 2.0}))
    assert _ScaleMixin._initial_scale(scheduler, admitted) == 2.0
    # an own scale whose window does not hold the prompt escalates at once
    own = SimpleNamespace(request_id="r3", num_tokens=1500, num_prompt_tokens=1500,
                          sampling_params=SimpleNamespace(extra_args={"yarn_factor": 1.0}))
    assert _ScaleMixin._initial_scale(scheduler, own) == 2.0  # 1500 + reserve 512 <= 2 x 1024
