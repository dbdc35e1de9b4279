"""Dynamic YaRN's pieces against their references: the per-scale maths, the angle table,
the CPU pre-RoPE paged-attention kernel, the vLLM backend (cache writes and attention
paths), and what dynamic mode changes in vLLM's engine config."""

from __future__ import annotations

import math
import re

import pytest
import torch

from conftest import TOL
from yarn_vllm.yarn import yarn_math
from yarn_vllm.attention.angles import angle_table
from yarn_vllm.attention.reference import paged_attention_reference
from yarn_vllm.yarn.config import YarnConfig
from yarn_vllm.errors import UserError
from yarn_vllm.ops import HAS_EXTENSION
from yarn_vllm.yarn.scale_policy import ScalePolicy

needs_kernel = pytest.mark.skipif(not HAS_EXTENSION, reason="yarn_vllm._C not built")


def dynamic_policy(original=256, factor=16.0, headroom=1.0, rotary_dim=64):
    return ScalePolicy(YarnConfig(factor=factor, original_max_position=original, mode="dynamic",
                                  dynamic_headroom=headroom), rotary_dim, 10000.0)


ROPE = dynamic_policy()


# ---- maths ------------------------------------------------------------------------------

@pytest.mark.parametrize("seq_len", [1, 255, 256, 257, 1000, 4096])
def test_scale_frequencies_and_attention_scale_follow_the_length(seq_len):
    """Against the paper written out in float64: s = max(1, l / L) (Eq. 24); frequencies of
    Eq. 17-19 with the ramp over dimension indices j between the indices where a band
    turns 32 and 1 times over L (Eq. 16, rounded outwards as released checkpoints assume);
    logits times (0.1 ln s + 1)^2 (Eq. 22, squared)."""
    s = ROPE.dynamic_factor(seq_len)
    assert s == max(1.0, seq_len / 256)
    theta = 10000.0 ** (-torch.arange(0, 64, 2, dtype=torch.float64) / 64)
    def index_of(rotations):  # j with L / lambda_j = rotations, lambda_j = 2 pi / theta_j
        return 64 * math.log(256 / (2 * math.pi * rotations)) / (2 * math.log(10000.0))
    low, high = max(math.floor(index_of(32)), 0), min(math.ceil(index_of(1)), 63)
    interpolated = ((torch.arange(32, dtype=torch.float64) - low) / (high - low)).clamp(0, 1)
    expected = interpolated * theta / s + (1 - interpolated) * theta
    torch.testing.assert_close(ROPE.inv_freq(s).double(), expected, rtol=1e-6, atol=0)
    if s == 1.0:
        assert torch.equal(ROPE.inv_freq(s), yarn_math.rope_inv_freq(64, 10000.0))
    assert ROPE.attention_scale(s) == pytest.approx((0.1 * math.log(s) + 1.0) ** 2)


@pytest.mark.parametrize("seq_len", [1, 100, 128, 300, 700, 1024, 1500, 3000])
def test_headroom_leads_the_scale_up_to_the_factor(seq_len):
    """c = 2, factor 4, L = 256: s is twice what the length needs, until s reaches 4; past
    4 L the length alone decides (as with c = 1)."""
    rope = dynamic_policy(factor=4.0, headroom=2.0)
    needs = seq_len / 256
    expected = 1.0 if 2 * needs <= 1 else (2 * needs if 2 * needs <= 4 else max(4.0, needs))
    assert rope.dynamic_factor(seq_len) == pytest.approx(expected, rel=1e-12)
    assert ROPE.dynamic_factor(seq_len) == max(1.0, needs)  # headroom 1 is the paper's rule


def test_scale_one_is_plain_rope():
    plain = yarn_math.rope_inv_freq(64, 10000.0)
    assert torch.equal(ROPE.inv_freq(1.0), plain)
    assert ROPE.attention_scale(1.0) == 1.0
    # an explicit attention_factor is static-mode only: s = 1 still runs as trained
    policy = ScalePolicy(YarnConfig(factor=4.0, original_max_position=256, mode="dynamic",
                                    attention_factor=1.3), 64, 10000.0)
    assert policy.attention_scale(1.0) == 1.0 and policy.attention_scale(2.0) == 1.3 ** 2


def test_angle_table_composes_to_exact_angles():
    lens = [70, 1000, 70, 300]
    inv, _ = ROPE.per_sequence(lens)
    table, start = angle_table(lens, inv)
    assert start[0] == start[2]  # one scale, one block of rows
    half = 32
    for b, n in enumerate(lens):
        rows = table[int(start[b]):]
        fine, coarse = rows[:32], rows[32:]
        pos = torch.arange(n)
        c = coarse[pos // 32]
        f = fine[pos % 32]
        cos = c[:, :half] * f[:, :half] - c[:, half:] * f[:, half:]
        sin = c[:, half:] * f[:, :half] + c[:, :half] * f[:, half:]
        exact = torch.outer(pos.double(), inv[b].double())
        torch.testing.assert_close(cos.double(), exact.cos(), rtol=0, atol=1e-6)
        torch.testing.assert_close(sin.double(), exact.sin(), rtol=0, atol=1e-6)


# ---- kernel -----------------------------------------------------------------------------

def _batch(seq_lens, q_lens, *, q_heads=4, kv_heads=2, head=64, rotary=64, block=32,
           dtype=torch.float32, is_neox=True, seed=0):
    """A random paged batch in vLLM's CPU cache layout, with shuffled block tables."""
    g = torch.Generator().manual_seed(seed)
    per_seq = [(n + block - 1) // block for n in seq_lens]
    num_blocks = sum(per_seq) + 2
    kv = torch.randn(num_blocks, kv_heads, 2 * block, head, generator=g).to(dtype)
    perm = torch.randperm(num_blocks, generator=g).to(torch.int32)
    table = torch.zeros(len(seq_lens), max(per_seq), dtype=torch.int32)
    used = 0
    for b, n in enumerate(per_seq):
        table[b, :n] = perm[used:used + n]
        used += n
    inv, mult = dynamic_policy(rotary_dim=rotary).per_sequence(seq_lens)
    qsl = torch.zeros(len(q_lens) + 1, dtype=torch.int32)
    qsl[1:] = torch.tensor(q_lens).cumsum(0)
    return {"query": torch.randn(sum(q_lens), q_heads, head, generator=g).to(dtype),
            "key_cache": kv[:, :, :block], "value_cache": kv[:, :, block:], "block_table": table,
            "seq_lens": torch.tensor(seq_lens, dtype=torch.int32), "query_start_loc": qsl,
            "inv_freq": inv, "logit_scale": mult * head ** -0.5, "is_neox": is_neox,
            "kv": kv}


def _run_kernel(b, with_table=True):
    out = torch.empty_like(b["query"])
    table = start = None
    if with_table:
        table, start = angle_table(b["seq_lens"].tolist(), b["inv_freq"])
    torch.ops.yarn_vllm.paged_attention(
        out, b["query"], b["key_cache"], b["value_cache"], b["block_table"], b["seq_lens"],
        b["query_start_loc"], b["inv_freq"], b["logit_scale"], table, start, b["is_neox"])
    return out


def _reference(b):
    return paged_attention_reference(b["query"], b["key_cache"], b["value_cache"],
                                     b["block_table"], b["seq_lens"], b["query_start_loc"],
                                     b["inv_freq"], b["logit_scale"], b["is_neox"], torch.float64)


CASES = {
    "decode": ([700], [1]),
    "decode_long_split": ([5000], [1]),           # split along keys, merged
    "decode_batch_scales": ([100, 3000, 257, 4500], [1, 1, 1, 1]),
    "prefill": ([300], [300]),
    "chunk_after_prefix": ([900], [200]),
    "mixed": ([300, 2600, 40, 900], [300, 1, 40, 7]),
    "short_extend_split": ([4100], [5]),
}


@needs_kernel
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("with_table", [True, False])
def test_kernel_matches_reference(case, with_table):
    b = _batch(*CASES[case])
    # Without the table the kernel forms angles in fp32, as the fp32 reference does.
    ref = _reference(b) if with_table else paged_attention_reference(
        b["query"], b["key_cache"], b["value_cache"], b["block_table"], b["seq_lens"],
        b["query_start_loc"], b["inv_freq"], b["logit_scale"], True, torch.float32)
    torch.testing.assert_close(_run_kernel(b, with_table), ref, rtol=1e-4, atol=2e-5)


@needs_kernel
@pytest.mark.parametrize("kw", [dict(rotary=32), dict(is_neox=False), dict(block=16),
                                dict(q_heads=6, kv_heads=2, head=128, rotary=128),
                                dict(q_heads=2, kv_heads=2)], ids=str)
def test_kernel_shapes_and_styles(kw):
    b = _batch([1500, 90], [1, 90], **kw)
    torch.testing.assert_close(_run_kernel(b), _reference(b), rtol=1e-4, atol=2e-5)


# Half-precision kernel outputs against the float64 reference. bf16: where the CPU has
# AVX512-BF16, the kernel's many-row (prefill) products are bf16 dot products: q and k after
# RoPE and the probabilities round to bf16 (2^-9 each, as vLLM's bf16 kernels round its
# post-RoPE q and k), so a logit of size ~3 moves by ~2^-7, the output by a few bf16 ulps.
HALF_TOL = {torch.bfloat16: dict(rtol=2 ** -6, atol=8e-3),
            torch.float16: dict(rtol=2 * TOL[torch.float16]["rtol"], atol=2e-3)}


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_kernel_half_precision(dtype):
    b = _batch([1200, 64], [1, 64], dtype=dtype)
    out = _run_kernel(b).float()
    torch.testing.assert_close(out, _reference(b), **HALF_TOL[dtype])


@needs_kernel
def test_kernel_uses_each_sequences_own_scale():
    b = _batch([3000, 3000], [1, 1])
    b["query"][1] = b["query"][0]
    b["block_table"][1] = b["block_table"][0]
    b["inv_freq"][1], b["logit_scale"][1] = ROPE.inv_freq(1.0), 0.125  # as if unscaled
    out = _run_kernel(b, with_table=False)
    torch.testing.assert_close(out, _reference(b), rtol=1e-4, atol=2e-5)
    assert (out[0] - out[1]).abs().max() > 1e-2


@needs_kernel
@pytest.mark.parametrize("field,mutate,message", [
    ("block_table", lambda b: b.update(block_table=b["block_table"].long()), "block_table"),
    ("seq_lens", lambda b: b.update(seq_lens=b["seq_lens"] * 100), "block_table"),
    ("inv_freq", lambda b: b.update(inv_freq=b["inv_freq"].double()), "inv_freq"),
    ("value_cache", lambda b: b.update(value_cache=b["value_cache"][:, :1]), "value_cache"),
    ("query", lambda b: b.update(query=b["query"].double()), "key_cache"),
], ids=lambda x: x if isinstance(x, str) else "")
def test_kernel_rejects_bad_arguments_by_name(field, mutate, message):
    b = _batch([100], [1])
    mutate(b)
    with pytest.raises(RuntimeError, match=message):
        _run_kernel(b, with_table=False)


# ---- backend ----------------------------------------------------------------------------

@needs_kernel
@pytest.mark.parametrize("headroom", [1.0, 2.0])
def test_backend_writes_pre_rope_keys_and_attends_like_the_reference(headroom):
    """do_kv_cache_update + forward over a mixed batch: a prefill, a decode, a tiny prompt
    and a late chunk, in the op's one call (query tiles beside key splits)."""
    from types import SimpleNamespace

    from yarn_vllm.attention.backend import YarnDynamicAttentionImpl, YarnDynamicMetadataBuilder

    builder = YarnDynamicMetadataBuilder.detached(dynamic_policy(factor=4.0, headroom=headroom))
    seq_lens, q_lens = [400, 900, 5, 2100], [400, 1, 5, 150]  # prefill, decode, tiny, chunk
    b = _batch(seq_lens, q_lens)
    g = torch.Generator().manual_seed(1)
    new_k = torch.randn(sum(q_lens), 2, 64, generator=g)
    new_v = torch.randn(sum(q_lens), 2, 64, generator=g)
    # Slots of the new tokens: the last q_len positions of each sequence, plus one pad.
    slots = []
    for i, (n, q) in enumerate(zip(seq_lens, q_lens)):
        for t in range(n - q, n):
            slots.append(int(b["block_table"][i, t // 32]) * 32 + t % 32)
    slot_mapping = torch.tensor(slots + [-1])
    kv_cache = b["kv"].view(b["kv"].shape[0], 2, 32, 128)  # vLLM's CPU [nb, H, bs, 2D] view
    impl = YarnDynamicAttentionImpl(4, 64, 64 ** -0.5, 2, None, None, "auto")
    impl.do_kv_cache_update(None, torch.cat((new_k, new_k[:1])), torch.cat((new_v, new_v[:1])),
                            kv_cache, slot_mapping)
    common = SimpleNamespace(num_reqs=len(seq_lens), num_actual_tokens=sum(q_lens),
                             query_start_loc_cpu=b["query_start_loc"], seq_lens=b["seq_lens"],
                             block_table_tensor=b["block_table"], slot_mapping=slot_mapping)
    meta = builder.build(0, common)
    output = torch.empty(sum(q_lens), 4 * 64)
    impl.forward(None, b["query"], new_k, new_v, kv_cache, meta, output)
    # the cache must now hold the new keys and values unrotated, where the slots say
    torch.testing.assert_close(_gather(b["key_cache"], b["block_table"], seq_lens, q_lens), new_k)
    torch.testing.assert_close(_gather(b["value_cache"], b["block_table"], seq_lens, q_lens),
                               new_v)
    # expected scales from the paper's formulas, not from the builder under test; with
    # headroom 2 (factor 4) they are 3.125, 4 (capped), 1 and 8.2 (the length needs > 4)
    scales = ([max(1.0, n / 256) for n in seq_lens] if headroom == 1.0
              else [3.125, 4.0, 1.0, 2100 / 256])
    b["inv_freq"] = torch.stack([yarn_math.yarn_inv_freq(64, 10000.0, s, 256) for s in scales])
    b["logit_scale"] = torch.tensor([(0.1 * math.log(s) + 1.0) ** 2 * 64 ** -0.5
                                     for s in scales])
    torch.testing.assert_close(output.view(-1, 4, 64), _reference(b), rtol=1e-4, atol=2e-5)


def _gather(cache, table, seq_lens, q_lens):
    rows = []
    for i, (n, q) in enumerate(zip(seq_lens, q_lens)):
        for t in range(n - q, n):
            rows.append(cache[int(table[i, t // 32]), :, t % 32])
    return torch.stack(rows)


def test_backend_refuses_unsupported_features_by_name():
    from yarn_vllm.attention.backend import YarnDynamicAttentionImpl

    with pytest.raises(UserError, match="sliding_window"):
        YarnDynamicAttentionImpl(4, 64, 0.125, 2, None, 128, "auto")
    with pytest.raises(UserError, match="kv_cache_dtype"):
        YarnDynamicAttentionImpl(4, 64, 0.125, 2, None, None, "fp8")


# ---- engine configuration ---------------------------------------------------------------

def _vllm_config(model_dir, hf_overrides, **kwargs):
    from vllm.engine.arg_utils import EngineArgs

    args = EngineArgs(model=model_dir, hf_overrides=hf_overrides, skip_tokenizer_init=True,
                      max_model_len=hf_overrides["max_position_embeddings"], **kwargs)
    return args.create_engine_config()


def _overrides(tiny_llama, mode):
    import json
    import os

    from yarn_vllm.yarn.config import YarnConfig

    hf = json.load(open(os.path.join(tiny_llama, "config.json")))
    return YarnConfig(factor=4.0, mode=mode).hf_overrides(hf)


@needs_kernel
def test_dynamic_mode_selects_our_backend_and_keeps_the_serving_features(tiny_llama):
    """Chunked prefill, the token budget and prefix caching stay as the user set them."""
    import yarn_vllm

    yarn_vllm.register()
    config = _vllm_config(tiny_llama, _overrides(tiny_llama, "dynamic"),
                          enable_prefix_caching=True, max_num_batched_tokens=256)
    assert config.attention_config.backend.name == "CUSTOM"
    assert config.cache_config.enable_prefix_caching is True
    assert config.scheduler_config.enable_chunked_prefill is True
    assert config.scheduler_config.max_num_batched_tokens == 256


def test_prefill_chunks_run_at_the_scale_of_the_whole_prompt():
    """l <= P (still in the prompt): s(P), whichever chunk; past it, s(l)."""
    policy = dynamic_policy(factor=4.0)
    seq_lens, prompt_lens = [256, 512, 768, 769, 300, 100], [768, 768, 768, 768, 100, 100]
    inv, attention_scale = policy.per_sequence(seq_lens, prompt_lens)
    expected = [3.0, 3.0, 3.0, 769 / 256, 300 / 256, 1.0]
    for b, s in enumerate(expected):
        assert torch.equal(inv[b], policy.inv_freq(s))
        assert attention_scale[b].item() == pytest.approx((0.1 * math.log(s) + 1.0) ** 2)
    alone, _ = policy.per_sequence(seq_lens)  # no prompt lengths: each step's own length
    assert torch.equal(alone[0], policy.inv_freq(1.0))


@pytest.mark.parametrize("seq_len,expected", [(100, 1.0), (256, 1.0), (257, 1.25), (300, 1.25),
                                              (320, 1.25), (321, 1.5), (1000, 4.0)])
def test_scale_step_rounds_up_and_keeps_s_monotone(seq_len, expected):
    policy = ScalePolicy(YarnConfig(factor=4.0, original_max_position=256, mode="dynamic",
                                    dynamic_scale_step=0.25), 64, 10000.0)
    assert policy.dynamic_factor(seq_len) == expected
    lens = torch.arange(1, 2000)
    s = policy.dynamic_factor(lens)
    assert bool((s[1:] >= s[:-1]).all()) and s[255].item() == 1.0
    assert torch.equal(s, torch.tensor([policy.dynamic_factor(int(n)) for n in lens]))


@needs_kernel
def test_static_mode_config_is_untouched(tiny_llama):
    import yarn_vllm

    yarn_vllm.register()
    ours = _vllm_config(tiny_llama, _overrides(tiny_llama, "static"), enable_prefix_caching=True)
    assert ours.attention_config.backend is None
    assert ours.cache_config.enable_prefix_caching is True


@needs_kernel
def test_dynamic_mode_with_another_backend_is_a_clear_error(tiny_llama):
    import yarn_vllm

    yarn_vllm.register()
    # vLLM wraps errors raised while it validates its config (pydantic ValidationError)
    with pytest.raises(ValueError, match="`attention_backend` is CPU_ATTN.*drop --attention-backend"):
        _vllm_config(tiny_llama, _overrides(tiny_llama, "dynamic"), attention_backend="CPU_ATTN")


@needs_kernel
def test_headroom_reaches_the_builders_policy(tiny_llama):
    """rope_parameters.yarn_dynamic_headroom (from --dynamic-headroom) -> the vllm_config the
    metadata builder is given -> its policy, with the configured factor as its cap; the
    rotary layer built under the same config agrees with it."""
    import json
    import os

    from vllm.config import set_current_vllm_config

    import yarn_vllm
    from yarn_vllm.attention.backend import YarnDynamicMetadataBuilder
    from yarn_vllm.vllm_seam.rotary import YarnRotaryEmbedding

    yarn_vllm.register()
    hf = json.load(open(os.path.join(tiny_llama, "config.json")))
    overrides = YarnConfig(factor=4.0, mode="dynamic", dynamic_headroom=2.0).hf_overrides(hf)
    assert overrides["rope_parameters"]["yarn_dynamic_headroom"] == 2.0
    config = _vllm_config(tiny_llama, overrides)
    with set_current_vllm_config(config):
        layer = YarnRotaryEmbedding(64, 64, 1024, 10000.0, True, 4.0, torch.float32)
        with pytest.raises(ValueError, match="`rope_parameters` of a rotary layer"):
            YarnRotaryEmbedding(64, 64, 1024, 10000.0, True, 2.0, torch.float32)
        with pytest.raises(ValueError, match="`is_neox_style` is False"):
            YarnRotaryEmbedding(64, 64, 1024, 10000.0, False, 4.0, torch.float32)
    policy = YarnDynamicMetadataBuilder(None, [], config, torch.device("cpu")).policy
    assert policy == layer.policy
    assert (policy.config.dynamic_headroom, policy.factor, policy.original_max_position) == (
        2.0, 4.0, 1024)
    assert policy.dynamic_factor(1024) == 2.0 and policy.dynamic_factor(3000) == 4.0


@needs_kernel
def test_bad_headroom_in_rope_parameters_is_a_clear_error(tiny_llama):
    import yarn_vllm

    yarn_vllm.register()
    overrides = _overrides(tiny_llama, "dynamic")
    overrides["rope_parameters"]["yarn_dynamic_headroom"] = 0.5
    with pytest.raises(ValueError, match="`dynamic_headroom` is 0.5.*number >= 1"):
        _vllm_config(tiny_llama, overrides)


OTHER_ROPES = {
    "llama3": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 512,
               "rope_theta": 10000.0},
    "static_yarn": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0,
                    "original_max_position_embeddings": 1024, "beta_fast": 16},
}


@needs_kernel
@pytest.mark.parametrize("name", list(OTHER_ROPES))
def test_models_not_in_dynamic_mode_pass_the_hook_untouched(tiny_llama, name):
    """The hook runs for every model vLLM configures; it must neither raise nor change them."""
    import copy

    import yarn_vllm
    from yarn_vllm.vllm_seam.engine_settings import configure

    yarn_vllm.register()
    config = _vllm_config(tiny_llama, {"max_position_embeddings": 4096,
                                       "rope_parameters": OTHER_ROPES[name]})
    parts = ("scheduler_config", "cache_config", "attention_config")
    before = {p: copy.deepcopy(vars(getattr(config, p))) for p in parts}
    configure(config)
    assert {p: vars(getattr(config, p)) for p in parts} == before
    assert config.attention_config.backend is None


@needs_kernel
def test_dynamic_mode_refuses_architectures_it_does_not_cover(tiny_llama):
    import yarn_vllm

    yarn_vllm.register()
    overrides = dict(_overrides(tiny_llama, "dynamic"), architectures=["GraniteForCausalLM"])
    with pytest.raises(ValueError, match="`architectures` is .*Granite.*yarn_mode 'static'"):
        _vllm_config(tiny_llama, overrides)


@needs_kernel
@pytest.mark.parametrize("params,field", [
    ({"yarn_mode": "dynamc"}, "mode"),                 # a typo used to be served as static
    ({"yarn_mode": "request", "yarn_dynamic_headroom": 2.0}, "dynamic_headroom"),
    ({"beta_fast": 0.5}, "beta_fast"),                 # beta_fast below beta_slow
    ({"factor": 0.5}, "factor"),
    ({"attention_factor": float("nan")}, "attention_factor"),
])
def test_every_yarn_config_vllm_is_given_is_validated(tiny_llama, params, field):
    """A config.json or --hf-overrides fed to vLLM directly, in any mode, is refused by name
    before any weight loads (issue 14)."""
    import yarn_vllm

    yarn_vllm.register()
    overrides = _overrides(tiny_llama, "static")
    overrides["rope_parameters"].update(params)
    with pytest.raises(ValueError, match=f"`{field}`"):
        _vllm_config(tiny_llama, overrides)



@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("n", [1, 2, 13, 300])
def test_cache_write_puts_each_token_where_its_slot_says(dtype, n):
    """do_kv_cache_update (the kv_cache_write op on the CPU) against a plain loop over vLLM's
    [num_blocks, H, block_size, 2D] layout (a block's keys, then its values, per head): odd
    sizes, keys and values sliced out of a fused qkv row, -1 pads skipped, rows past the
    slots ignored, every other cache row left alone."""
    from yarn_vllm.attention.backend import YarnDynamicAttentionImpl

    heads, head, block_size, blocks = 3, 80, 24, 20
    impl = YarnDynamicAttentionImpl(heads, head, head ** -0.5, heads, None, None, "auto")
    g = torch.Generator().manual_seed(n)
    slots = torch.randperm(blocks * block_size, generator=g)[:n]
    if n > 1:
        slots[n // 2] = -1  # a pad
    qkv = torch.randn(n + 2, 3 * heads * head, generator=g).to(dtype)  # rows past the slots too
    key = qkv[:, heads * head:2 * heads * head].view(n + 2, heads, head)
    value = qkv[:, 2 * heads * head:].view(n + 2, heads, head)
    start = torch.randn(blocks, heads, block_size, 2 * head, generator=g).to(dtype)
    got = start.clone()
    impl.do_kv_cache_update(None, key, value, got, slots)
    expected = start.view(blocks, heads, 2, block_size, head).clone()
    for t, slot in enumerate(slots.tolist()):
        if slot >= 0:
            expected[slot // block_size, :, 0, slot % block_size] = key[t]
            expected[slot // block_size, :, 1, slot % block_size] = value[t]
    assert torch.equal(got.view_as(expected), expected)


# name -> (how the arguments are spoiled, the refusal expected); the slot cases, one past
# the cache's last row and one below the pad, are what an off-by-one in the op's check
# would turn into a write outside the cache
CACHE_WRITE_REFUSALS = {
    "slot_past_cache": (lambda a: a["slots"].__setitem__(1, 20 * 24),
                        "slot_mapping: token 1 has slot 480, outside"),
    "slot_below_pad": (lambda a: a["slots"].__setitem__(0, -2),
                       "slot_mapping: token 0 has slot -2"),
    "slots_int32": (lambda a: a.update(slots=a["slots"].int()),
                    "slot_mapping: expected a contiguous int64"),
    "key_fp64": (lambda a: a.update(key=a["key"].double()), "key: dtype Double differs"),
    "value_heads": (lambda a: a.update(value=a["value"][:, :2]),
                    r"value: expected \(T, H_kv=3, D=80\)"),
    "key_strided_channels": (lambda a: a.update(key=a["key"][..., ::2]),
                             r"key: expected \(T, H_kv=3, D=80\)"),
    "cache_strided": (lambda a: a.update(cache=a["cache"].transpose(1, 2)),
                      "kv_cache: expected a contiguous"),
    "cache_odd_width": (lambda a: a.update(cache=a["cache"][..., :-1].contiguous()),
                        "kv_cache: expected H_kv > 0"),
}


def cache_write_probe(name: str) -> dict:
    """{"op": .., "meta": ..}: the first line of each one's refusal of CACHE_WRITE_REFUSALS
    [name], or "accepted" ("not checked" for the Meta twin on slot values, which it cannot
    read). Runs in a child process (isolated.run_probes): a write past the cache kills the
    child only."""
    g = torch.Generator().manual_seed(0)
    a = {"key": torch.randn(4, 3, 80, generator=g), "value": torch.randn(4, 3, 80, generator=g),
         "cache": torch.zeros(20, 3, 24, 160), "slots": torch.tensor([0, 5, -1, 479])}
    torch.ops.yarn_vllm.kv_cache_write(a["key"], a["value"], a["cache"], a["slots"])
    CACHE_WRITE_REFUSALS[name][0](a)
    args = (a["key"], a["value"], a["cache"], a["slots"])
    meta = [torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device="meta") for t in args]
    from isolated import refusal

    write = torch.ops.yarn_vllm.kv_cache_write
    return {"op": refusal(lambda: write(*args)),
            "meta": "not checked" if name.startswith("slot_") else refusal(lambda: write(*meta))}


@needs_kernel
def test_cache_write_refuses_bad_arguments_by_name():
    """The op and its Meta twin (what torch.compile traces) refuse alike, by name; slot
    values only where they can be read (the op). The probes run in a child process."""
    from isolated import run_probes

    results = run_probes("test_dynamic_attention", "cache_write_probe", list(CACHE_WRITE_REFUSALS))
    for name, (_, message) in CACHE_WRITE_REFUSALS.items():
        found = results[name]
        assert re.search(message, found["op"]), (name, found)
        assert found["meta"] == "not checked" or re.search(message, found["meta"]), (name, found)
    torch.library.opcheck(torch.ops.yarn_vllm.kv_cache_write.default,
                          (torch.randn(2, 3, 8), torch.randn(2, 3, 8), torch.zeros(4, 3, 8, 16),
                           torch.tensor([3, -1])), test_utils=("test_schema", "test_faketensor"))
