"""The paged_attention op's one argument contract (csrc/paged_attention_checks.h).

Every implementation must refuse the same bad arguments with the same one-line
message: the CPU op, its Meta twin (what torch.compile traces), the Triton wrapper
(through the paged_attention_check op) and the CUDA launcher (emulated on the CPU,
with its debug value checks on). The first rows are the crashes of issue 14: each
used to kill the process (double free, segfault, bus error, SIGFPE); CRASHES are
issue 24's, run in a child process so that a regression fails a test, not pytest.
"""

from __future__ import annotations

import re
import shutil

import pytest
import torch

from conftest import TOL
from paged_cases import make_case, new_out, reference, run_triton
from yarn_vllm import ops

pytestmark = pytest.mark.skipif(not ops.HAS_EXTENSION, reason="yarn_vllm._C not built")

# A mixed batch of B = 5: q_lens [1, 6, 10, 1, 0], seq_lens [45, 6, 23, 30, 12], block size 8.
BASE = "mixed"


def _set(key, index, value):
    def mutate(c):
        c[key] = c[key].clone()
        c[key][index] = value
    return mutate


def _replace(key, fn):
    return lambda c: c.update({key: fn(c[key])})


def _both_caches(fn):
    return lambda c: c.update(key_cache=fn(c["key_cache"]), value_cache=fn(c["value_cache"]))


# name: (mutation, message, kind); "value" cases need the tensors' contents, which the
# Meta twin never has.
BAD = {
    "qsl_past_rows": (_set("query_start_loc", -1, 19), "query_start_loc: ends at 19, past", "value"),
    "qsl_far_past": (_set("query_start_loc", -1, 1 << 30), "query_start_loc: ends at 1073741824",
                     "value"),
    "qsl_negative_start": (_set("query_start_loc", 0, -1), "query_start_loc: starts at -1", "value"),
    "qsl_decreasing": (_set("query_start_loc", 2, 0), "query_start_loc: decreases at sequence 1",
                       "value"),
    "seq_len_int32_max": (_set("seq_lens", 0, 2 ** 31 - 1),
                          "seq_lens: sequence 0 has 2147483647 tokens, more than block_table",
                          "value"),
    "zero_kv_heads": (_both_caches(lambda t: t[:, :0]), "key_cache: 0 kv heads", "shape"),
    "block_size_zero": (_both_caches(lambda t: t[:, :, :0]), "key_cache: block size 0", "shape"),
    "logit_scale_nan": (_set("logit_scale", 1, float("nan")), "logit_scale: sequence 1 has nan",
                        "value"),
    "logit_scale_inf": (_set("logit_scale", 3, float("inf")), "logit_scale: sequence 3 has inf",
                        "value"),
    "block_id_past_cache": (lambda c: _set("block_table", (1, 0), c["key_cache"].shape[0])(c),
                            "block_table: sequence 1 uses block", "value"),
    "block_id_negative": (_set("block_table", (2, 2), -1), "block_table: sequence 2 uses block -1",
                          "value"),
    "seq_shorter_than_query": (_set("seq_lens", 2, 3),
                               "seq_lens: sequence 2 has 3 tokens but 10 queries", "value"),
    "block_table_int64": (_replace("block_table", torch.Tensor.long),
                          "block_table: expected int32", "shape"),
    "block_table_extra_row": (_replace("block_table", lambda t: torch.cat((t, t[:1]))),
                              r"seq_lens: expected a contiguous \(6,\)", "shape"),
    "seq_lens_short": (_replace("seq_lens", lambda t: t[:-1]), r"seq_lens: expected a contiguous "
                       r"\(5,\)", "shape"),
    "qsl_short": (_replace("query_start_loc", lambda t: t[:-1]), "query_start_loc: expected a "
                  r"contiguous \(6,\)", "shape"),
    "inv_freq_fp64": (_replace("inv_freq", torch.Tensor.double), "inv_freq: expected fp32",
                      "shape"),
    "inv_freq_extra_row": (_replace("inv_freq", lambda t: torch.cat((t, t[:1]))),
                           "inv_freq: expected fp32", "shape"),
    "rotary_past_head": (_replace("inv_freq", lambda t: torch.cat((t, t), 1)),
                         r"inv_freq: 32 frequencies \(rotary_dim / 2\) must be in", "shape"),
    "logit_scale_short": (_replace("logit_scale", lambda t: t[:1]), "logit_scale: expected",
                          "shape"),
    "heads_not_a_multiple": (_replace("query", lambda t: t[:, :3]),
                             "key_cache: 2 kv heads; expected a positive divisor of query's 3",
                             "shape"),
    "value_cache_fp16": (_replace("value_cache", torch.Tensor.half), "value_cache: dtype float16",
                         "shape"),
    "key_cache_head_size": (_both_caches(lambda t: t[..., :16]), "key_cache: head size 16",
                            "shape"),
    "query_fp64": (_replace("query", torch.Tensor.double), "key_cache: dtype float32 differs from "
                   "query's Double", "shape"),
    "query_strided_channels": (_replace("query", lambda t: t[..., ::2].repeat_interleave(2, -1)
                                        .transpose(1, 2).contiguous().transpose(1, 2)),
                               "query: expected", "shape"),
}


def _args(c, out=None):
    return (c["query"] if out is None else out, c["query"], c["key_cache"], c["value_cache"],
            c["block_table"], c["seq_lens"], c["query_start_loc"], c["inv_freq"],
            c["logit_scale"], c.get("cos_sin"), c.get("cos_sin_start"), c["is_neox"])


def _meta(t):
    if not torch.is_tensor(t):
        return t
    return torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device="meta")


def run_cpu(c):
    torch.ops.yarn_vllm.paged_attention(*_args(c, new_out(c)))


def run_meta(c):
    torch.ops.yarn_vllm.paged_attention(*map(_meta, _args(c, new_out(c))))


def run_check_op(c):
    """What the Triton wrapper runs before anything else."""
    run_triton(c)


@pytest.fixture(scope="module")
def emulator():
    if shutil.which("g++") is None:
        pytest.skip("g++ not on PATH")
    from cuda_emu.emu import Emulator, build

    return Emulator(build())


def _message(fn, c) -> str:
    with pytest.raises(RuntimeError) as info:
        fn(c)
    return str(info.value).splitlines()[0]


@pytest.mark.parametrize("name", list(BAD))
def test_every_implementation_refuses_with_one_message(name, emulator):
    mutate, match, kind = BAD[name]
    impls = {"cpu": run_cpu, "check_op": run_check_op, "cuda_emulated": emulator}
    if kind == "shape":
        impls["meta"] = run_meta
    messages = {}
    for impl, fn in impls.items():
        case = make_case(BASE)
        mutate(case)
        if impl == "cuda_emulated":
            messages[impl] = _message(lambda c: fn(*_args(c, new_out(c))), case)
        else:
            messages[impl] = _message(fn, case)
    assert len(set(messages.values())) == 1, messages
    assert re.search(match, messages["cpu"]), messages


def _expanded(t, dim, n):
    """t with dimension `dim` stretched to n elements by a stride of 0 (no memory)."""
    return t.narrow(dim, 0, 1).expand(*t.shape[:dim], n, *t.shape[dim + 1:])


def _heads_2pow32(c):
    c["query"] = _expanded(c["query"], 1, 2 ** 32)
    _both_caches(lambda t: _expanded(t, 1, 2 ** 32))(c)


def _block_size_near_2pow61(c):
    """Rows of 8 blocks of 2^61 + 1 tokens (one block in the cache, so torch can size it):
    the product wraps to 8, so a check of max_blocks * block_size passed, and the block
    ids past the one used, never checked, were read."""
    c["block_table"] = torch.full((2, 8), 10 ** 6, dtype=torch.int32)
    c["block_table"][:, 0] = 0
    _both_caches(lambda t: _expanded(t[:1], 2, 2 ** 61 + 1))(c)


def _q_len_2pow24_group256(c):
    """One sequence of 2^24 queries, 256 q heads on 1 kv head: q_len * group wraps int32 to 0
    rows of scratch, which the query rows were then written past."""
    n = 2 ** 24
    c.update(query=_expanded(_expanded(c["query"][:, :1], 0, n), 1, 256),
             key_cache=_expanded(c["key_cache"][:1, :1, :1], 2, n),
             value_cache=_expanded(c["value_cache"][:1, :1, :1], 2, n),
             block_table=torch.zeros(1, 1, dtype=torch.int32),
             seq_lens=torch.tensor([n], dtype=torch.int32),
             query_start_loc=torch.tensor([0, n], dtype=torch.int32),
             inv_freq=c["inv_freq"][:1], logit_scale=c["logit_scale"][:1])


# Inputs that once crashed the process (issue 24): name: (spec of make_case, mutation, message).
# Each is refused by every implementation alike, the Meta twin included.
SMALL = ([8, 5], [1, 5], (4, 2), 32, 32, 8, torch.float32, {})
TINY_HEADS = ([8, 5], [1, 5], (2, 1), 2, 2, 8, torch.float32, {})
CRASHES = {
    "heads_2pow32_expanded": (None, _heads_2pow32,  # was SIGFPE: the group 0 / 0
                              "query: 4294967296 heads of 32 channels; expected at most 4096"),
    "block_size_near_2pow61": (TINY_HEADS, _block_size_near_2pow61,  # was an out-of-bounds read
                               "key_cache: block size 2305843009213693953; expected 1 to "),
    "q_len_2pow24_group256": (SMALL, _q_len_2pow24_group256,  # was an out-of-bounds write
                              r"query: 16777216 tokens of 256 heads; expected at most "
                              r"2147483647 rows \(tokens x heads\)"),
}


def crash_probe(name: str, emulator_lib: str) -> dict:
    """{implementation: the first line of its error, or "accepted"} for one CRASHES input.
    Runs in a child process (isolated.run_probes): a regression crashes the child only."""
    import ctypes

    from cuda_emu.emu import Emulator

    spec, mutate, _ = CRASHES[name]
    impls = {"cpu": run_cpu, "meta": run_meta, "check_op": run_check_op,
             "cuda_emulated": lambda c: Emulator(ctypes.CDLL(emulator_lib))(*_args(c, new_out(c)))}
    from isolated import refusal

    messages = {}
    for impl, fn in impls.items():
        case = make_case(BASE if spec is None else "probe", spec=spec)
        mutate(case)
        messages[impl] = refusal(lambda: fn(case))
    return messages


def test_inputs_that_crashed_the_process_are_refused(emulator):
    from isolated import run_probes

    results = run_probes("test_paged_attention_args", "crash_probe", list(CRASHES),
                         emulator.lib._name)
    for name, (_, _, match) in CRASHES.items():
        messages = results[name]
        assert len(set(messages.values())) == 1, (name, messages)
        assert re.search(match, messages["cpu"]), (name, messages)


@pytest.mark.parametrize("table", [True, False], ids=["cos_sin", "no_table"])
def test_junk_past_the_used_blocks_is_never_read(table):
    """vLLM pads block tables with whatever it likes: entries past a sequence's last block
    (here out of the cache's range) are neither checked nor read."""
    case = make_case(BASE)
    used = [(n + 7) // 8 for n in case["seq_lens"].tolist()]
    for b, n in enumerate(used):
        case["block_table"][b, n:] = [10 ** 6, -5][b % 2]
    if table:
        from yarn_vllm.attention.angles import angle_table

        case["cos_sin"], case["cos_sin_start"] = angle_table(case["seq_lens"].tolist(),
                                                            case["inv_freq"])
    out = new_out(case)
    torch.ops.yarn_vllm.paged_attention(*_args(case, out))
    torch.testing.assert_close(out, reference(case), **TOL[torch.float32])
    run_meta(case)
    torch.ops.yarn_vllm.paged_attention_check(*_args(case))


def test_angle_table_rows_are_checked():
    from yarn_vllm.attention.angles import angle_table

    case = make_case(BASE)
    case["cos_sin"], start = angle_table(case["seq_lens"].tolist(), case["inv_freq"])
    case["cos_sin_start"] = start + 1  # the last sequence's rows now run past the table
    with pytest.raises(RuntimeError, match="cos_sin_start: sequence"):
        run_cpu(case)
    case["cos_sin_start"] = None
    with pytest.raises(RuntimeError, match="cos_sin, cos_sin_start: pass both or neither"):
        run_cpu(case)


@pytest.mark.parametrize("seq_lens,q_lens", [([45, 6, 23, 30], [1, 6, 10, 1]),
                                             ([5000, 40], [1, 1])], ids=["tiles", "key_splits"])
def test_nan_key_propagates_as_in_the_reference(seq_lens, q_lens):
    """A NaN key turns exactly the rows that see it NaN (the softmax's NaN), whether its
    tile is scored by the vector or the generic path, or its split is merged."""
    spec = (seq_lens, q_lens, (4, 2), 64, 64, 32, torch.float32, {})
    case = make_case("nan", spec=spec)
    block = int(case["block_table"][0, 0])
    case["key_cache"][block, 1, 3, 5] = float("nan")  # key 3 of sequence 0, kv head 1
    out = new_out(case)
    torch.ops.yarn_vllm.paged_attention(*_args(case, out))
    expected = reference(case)
    assert expected.isnan().any() and not expected.isnan().all()
    assert torch.equal(out.isnan(), expected.isnan())
    torch.testing.assert_close(out[~out.isnan()], expected[~expected.isnan()], rtol=1e-4,
                               atol=2e-5)


def test_torch_compile_traces_only_what_the_kernel_accepts():
    """The Meta twin runs the same checks: a bad shape fails while tracing, not later."""
    good = make_case(BASE)
    bad = make_case(BASE)
    BAD["zero_kv_heads"][0](bad)

    def attend(case):
        out = torch.empty_like(case["query"])
        torch.ops.yarn_vllm.paged_attention(*_args(case, out))
        return out

    torch._dynamo.reset()
    compiled = torch.compile(attend, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(good), reference(good), **TOL[torch.float32])
    with pytest.raises(Exception, match="key_cache: 0 kv heads"):
        compiled(bad)


def test_opcheck_schema_and_meta_twin():
    case = make_case(BASE)
    torch.library.opcheck(torch.ops.yarn_vllm.paged_attention.default, _args(case, new_out(case)),
                          test_utils=("test_schema", "test_faketensor"))

