"""The rotary op (CPU kernel, CUDA kernel, PyTorch path) against references.

Two references: `ops.rotary_reference` (the fp32 PyTorch maths beside the kernels)
and `rope_complex` below, written from the paper in float64 (each channel pair a
complex number turned by e^{i m theta}), independent of both.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest
import torch

from conftest import TOL
from yarn_vllm import ops
from yarn_vllm.yarn import yarn_math

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
TOKENS = [1, 7, 989, 4099]
# (head_size, rotary_dim): full, partial, and halves of 10 and 14 that run the
# kernels' 16-, 8-lane, masked and scalar tails
SHAPES = [(64, 64), (128, 128), (128, 64), (80, 32), (80, 20), (64, 28)]
FACTORS = (1.0, 2.0, 4.0, 8.0)  # request mode's scales on offer, one row each
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
needs_ext = pytest.mark.skipif(not ops.HAS_EXTENSION, reason="yarn_vllm._C not built")


def rope_complex(x, positions, inv_freq, mscale, is_neox):
    """RoPE from its definition, in float64: pair j of token t is the complex number
    x_a + i x_b, times mscale_t e^{i theta}, theta = position_t * inv_freq[t, j] formed in
    fp32 as HF and vLLM form it. x: [T, H, D]; inv_freq: [T, d/2]; mscale: [T]."""
    half = inv_freq.shape[-1]
    x = x.double()
    a, b = (x[..., :half], x[..., half:2 * half]) if is_neox else (x[..., 0:2 * half:2],
                                                                    x[..., 1:2 * half:2])
    theta = (positions.float()[:, None] * inv_freq.float()).double()
    turn = torch.polar(mscale.double()[:, None].expand_as(theta), theta)[:, None, :]
    z = torch.complex(a, b) * turn
    out = x.clone()
    if is_neox:
        out[..., :half], out[..., half:2 * half] = z.real, z.imag
    else:
        out[..., 0:2 * half:2], out[..., 1:2 * half:2] = z.real, z.imag
    return out


def make_case(tokens, head_size, rotary_dim, dtype, device="cpu", heads_q=9, heads_k=3,
              scales=1):
    """Inputs and per-token rows: inv_freq [S, d/2], mscale [S], scale_index [T] (S > 1)."""
    gen = torch.Generator().manual_seed(tokens * 31 + head_size)
    inv = torch.stack([yarn_math.yarn_inv_freq(rotary_dim, 1e4, s, 2048) for s in FACTORS[-scales:]])
    mscale = torch.tensor([yarn_math.yarn_mscale(s) for s in FACTORS[-scales:]])
    # positions past factor x original too: the on-the-fly op has no table to overrun
    pos = torch.randint(0, 8 * 2048 + 4096, (tokens,), generator=gen)
    index = torch.randint(0, scales, (tokens,), generator=gen, dtype=torch.int32)
    q = torch.randn(tokens, heads_q * head_size, generator=gen).to(dtype)
    k = torch.randn(tokens, heads_k * head_size, generator=gen).to(dtype)
    on = lambda t: t.to(device)  # noqa: E731
    return on(pos), on(q), on(k), on(inv), on(mscale), on(index) if scales > 1 else None


def expected(x, pos, inv, mscale, index, head_size, is_neox):
    rows = torch.zeros_like(pos) if index is None else index.long()
    return ops.rotary_reference(x.view(x.shape[0], -1, head_size).cpu(), pos.cpu(),
                                inv.cpu()[rows.cpu()], mscale.cpu()[rows.cpu()], is_neox)


def check(impl, tokens, head_size, rotary_dim, dtype, is_neox, device="cpu", scales=1):
    pos, q, k, inv, mscale, index = make_case(tokens, head_size, rotary_dim, dtype, device,
                                              scales=scales)
    refs = [expected(x, pos, inv, mscale, index, head_size, is_neox) for x in (q, k)]
    impl(pos, q, k, inv, mscale, index, head_size, is_neox)
    for x, ref in zip((q, k), refs):
        torch.testing.assert_close(x.view_as(ref).float().cpu(), ref, **TOL[dtype])


def op(pos, q, k, inv, mscale, index, head_size, is_neox):
    torch.ops.yarn_vllm.rotary_embedding(pos, q, k, inv, mscale, index, head_size, is_neox)


@needs_ext
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens", TOKENS)
@pytest.mark.parametrize("head_size,rotary_dim", SHAPES)
@pytest.mark.parametrize("is_neox", [True, False])
def test_cpu_kernel_matches_reference(dtype, tokens, head_size, rotary_dim, is_neox):
    check(op, tokens, head_size, rotary_dim, dtype, is_neox)


@needs_ext
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens", [7, 989])
@pytest.mark.parametrize("head_size,rotary_dim", [(64, 64), (128, 128), (80, 20)])
@pytest.mark.parametrize("is_neox", [True, False])
def test_cpu_kernel_per_token_scales(dtype, tokens, head_size, rotary_dim, is_neox):
    """Request mode: each token takes its own frequency row and mscale."""
    check(op, tokens, head_size, rotary_dim, dtype, is_neox, scales=len(FACTORS))


@needs_ext
def test_one_row_per_scale_is_static_mode_bit_for_bit():
    """Static mode is S = 1 without an index; a token on row r of S rows gets exactly
    what static mode at row r gives: the per-token path changes no bits."""
    pos, q, k, inv, mscale, index = make_case(989, 128, 128, torch.bfloat16, scales=4)
    mixed_q, mixed_k = q.clone(), k.clone()
    op(pos, mixed_q, mixed_k, inv, mscale, index, 128, True)
    for r in range(4):
        rows = index == r
        q_r, k_r = q[rows].clone(), k[rows].clone()
        ops.rotary_embedding_(pos[rows], q_r, k_r, inv[r], float(mscale[r]), 128, True)
        assert torch.equal(q_r, mixed_q[rows]) and torch.equal(k_r, mixed_k[rows])


@pytest.mark.parametrize("head_size,rotary_dim", SHAPES)
@pytest.mark.parametrize("is_neox", [True, False])
def test_reference_matches_vllm_forward_static(head_size, rotary_dim, is_neox):
    """Our fp32 reference (and so the PyTorch fallback, which is it) against vLLM's own
    PyTorch rotary implementation fed the same YaRN cos/sin table: an independent check
    of the pairing, partial rotary and mscale conventions."""
    from vllm.model_executor.layers.rotary_embedding.base import RotaryEmbedding

    pos, q, k, inv, mscale, _ = make_case(989, head_size, rotary_dim, torch.float32)
    angles = torch.outer(torch.arange(int(pos.max()) + 1, dtype=torch.float32), inv[0])
    table = torch.cat((angles.cos(), angles.sin()), -1) * mscale
    q_v, k_v = RotaryEmbedding.forward_static(pos, q.clone(), k.clone(), head_size, rotary_dim,
                                              table, is_neox)
    q_t, k_t = q.clone(), k.clone()
    ops.rotary_embedding_torch_(pos, q_t, k_t, inv, mscale, head_size, is_neox)
    torch.testing.assert_close(q_t, q_v, **TOL[torch.float32])
    torch.testing.assert_close(k_t, k_v, **TOL[torch.float32])


@pytest.mark.parametrize("is_neox", [True, False])
def test_reference_matches_the_paper_per_token(is_neox):
    pos, q, _, inv, mscale, index = make_case(99, 80, 32, torch.float32, scales=4)
    rows = index.long()
    ref = ops.rotary_reference(q.view(99, -1, 80), pos, inv[rows], mscale[rows], is_neox)
    torch.testing.assert_close(ref.double(), rope_complex(q.view(99, -1, 80), pos, inv[rows],
                                                          mscale[rows], is_neox),
                               **TOL[torch.float32])


@needs_ext
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_positions_up_to_a_million(dtype):
    """On-the-fly cos/sin keep fp32 accuracy at 1M-token positions (range reduction)."""
    inv = yarn_math.yarn_inv_freq(128, 1e6, 32.0, 32768)
    pos = torch.linspace(900_000, 1_048_575, 257).long()
    q = torch.randn(257, 4 * 128, generator=torch.Generator().manual_seed(1)).to(dtype)
    ref = rope_complex(q.view(257, 4, 128), pos, inv.expand(257, -1), torch.full((257,), 1.3),
                       True)
    ops.rotary_embedding_(pos, q, None, inv, 1.3, 128, True)
    torch.testing.assert_close(q.view_as(ref).double(), ref, **TOL[dtype])


HUGE_POSITIONS = torch.tensor([2 ** 31 - 1, 3_400_000_000, 5_000_000_017, 2 ** 40 + 3,
                               2 ** 52 + 7, 2 ** 62, -(2 ** 33) - 5, 123])


@needs_ext
def test_any_int64_position_against_float64():
    """Angles past 2^31 rad used to overflow the vector sincos's quadrant (errors up to
    6.8 above ~3.3e9 rad); now every int64 position is exact to fp32, against float64
    cos/sin of the same fp32 angle."""
    inv = torch.tensor([1.0, 0.7, 0.31, 1e-3, 2.5, 1e-7, 0.999, 0.5, 1.0 / 3])
    x = torch.randn(8, 18, generator=torch.Generator().manual_seed(3))
    y = x.clone()
    ops.rotary_embedding_(HUGE_POSITIONS, y, None, inv, 1.0, 18, True)
    want = rope_complex(x[:, None], HUGE_POSITIONS, inv.expand(8, -1), torch.ones(8), True)
    torch.testing.assert_close(y.double(), want[:, 0], **TOL[torch.float32])


@needs_ext
def test_strided_views_from_fused_qkv():
    """vLLM hands q and k as column slices of one [T, (Hq + 2 Hk) D] tensor."""
    pos, q, k, inv, mscale, index = make_case(99, 64, 64, torch.bfloat16, scales=4)
    v = torch.randn(99, k.shape[1]).bfloat16()
    qkv = torch.cat((q, k, v), dim=1)
    qs, ks, vs = qkv.split([q.shape[1], k.shape[1], v.shape[1]], dim=1)
    assert not qs.is_contiguous()
    ops.rotary_embedding_(pos, qs, ks, inv, mscale, 64, True, scale_index=index)
    ops.rotary_embedding_(pos, q, k, inv, mscale, 64, True, scale_index=index)
    assert torch.equal(qs, q) and torch.equal(ks, k) and torch.equal(vs, v)


@needs_ext
def test_three_dim_and_no_key():
    pos, q, _, inv, mscale, _ = make_case(19, 64, 64, torch.float32)
    q3 = q.view(19, 9, 64).clone()
    ops.rotary_embedding_(pos, q3, None, inv, mscale, 64, False)
    torch.testing.assert_close(q3, expected(q, pos, inv, mscale, None, 64, False),
                               **TOL[torch.float32])


# Bad arguments: (mutation of (pos, q, k, inv, mscale, index, head_size), message, shape-only)
BAD = [
    (lambda a: a.update(pos=a["pos"].int()), "positions: expected int64", True),
    (lambda a: a.update(inv=a["inv"].double()), "inv_freq: expected a contiguous fp32", True),
    (lambda a: a.update(inv=a["inv"][0]), "inv_freq: expected a contiguous fp32", True),
    (lambda a: a.update(mscale=a["mscale"][:1]), "mscale: expected a contiguous fp32", True),
    (lambda a: a.update(q=a["q"][:, :-1]), "not a multiple of head_size", True),
    (lambda a: a.update(q=a["q"][:, :0], k=None), "query: 0 heads", True),
    (lambda a: a.update(k=a["k"][:, :0]), "key: 0 heads", True),
    (lambda a: a.update(head_size=0), "head_size: 0; expected > 0", True),
    (lambda a: a.update(k=a["k"].half()), "key: dtype", True),
    (lambda a: a.update(pos=a["pos"][:-1], index=None), "query: 8 tokens but 7 positions", True),
    (lambda a: a.update(index=a["index"].long()), "scale_index: expected a contiguous int32", True),
    (lambda a: a.update(index=a["index"][:-1]), "scale_index: expected a contiguous int32", True),
    (lambda a: a["index"].__setitem__(5, 4), "scale_index: token 5 has 4, outside the 4 rows", False),
    (lambda a: a["index"].__setitem__(2, -1), "scale_index: token 2 has -1", False),
]


def _bad_args(mutate):
    pos, q, k, inv, mscale, index = make_case(8, 64, 64, torch.bfloat16, scales=4)
    a = dict(pos=pos, q=q, k=k, inv=inv, mscale=mscale, index=index, head_size=64)
    mutate(a)
    return (a["pos"], a["q"], a["k"], a["inv"], a["mscale"], a["index"], a["head_size"], True)


@needs_ext
@pytest.mark.parametrize("mutate,match,shape_only", BAD)
def test_kernel_and_meta_twin_reject_bad_arguments(mutate, match, shape_only):
    """Each refused with a one-line error naming the argument; the Meta twin (what
    torch.compile traces) refuses every shape error the same way. The (T, 0) query
    without a key used to end in SIGFPE."""
    with pytest.raises(RuntimeError, match=match):
        torch.ops.yarn_vllm.rotary_embedding(*_bad_args(mutate))
    if shape_only:
        meta = [t.to("meta") if torch.is_tensor(t) else t for t in _bad_args(mutate)]
        with pytest.raises(RuntimeError, match=match):
            torch.ops.yarn_vllm.rotary_embedding(*meta)


# Head counts past int in an expanded (stride-0) query (issue 24): 2^32 + 1 heads were taken
# as 1 head and rotated silently; 2^31 were refused as "0 heads".
HEAD_COUNTS = {"heads_2pow32_plus1": 2 ** 32 + 1, "heads_2pow31": 2 ** 31}


def head_count_probe(name: str) -> dict:
    """{"cpu" | "meta": the first line of its error, or "accepted"} for one HEAD_COUNTS
    query. Runs in a child process (isolated.run_probes): past the check, the kernel would
    rotate 2^32 heads of each token."""
    pos, q, k, inv, mscale, index = make_case(8, 64, 64, torch.bfloat16, scales=4)
    q = q.view(8, -1, 64)[:, :1].expand(8, HEAD_COUNTS[name], 64)
    meta = lambda t: torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device="meta")  # noqa: E731
    from isolated import refusal

    def rotate(to):
        torch.ops.yarn_vllm.rotary_embedding(*map(to, (pos, q, k, inv, mscale, index)), 64, True)

    return {"cpu": refusal(lambda: rotate(lambda t: t)), "meta": refusal(lambda: rotate(meta))}


@needs_ext
def test_head_counts_past_int_are_refused_with_their_count():
    from isolated import run_probes

    results = run_probes("test_rotary_op", "head_count_probe", list(HEAD_COUNTS))
    for name, n in HEAD_COUNTS.items():
        assert results[name]["cpu"] == results[name]["meta"], results[name]
        assert results[name]["cpu"].startswith(f"query: {n} heads of head_size 64 in "), results


@needs_ext
def test_opcheck_schema_and_meta_twin():
    """The schema's aliasing and the Meta twin agree with the kernel (torch.compile)."""
    pos, q, k, inv, mscale, index = make_case(7, 64, 64, torch.bfloat16, scales=4)
    torch.library.opcheck(torch.ops.yarn_vllm.rotary_embedding.default,
                          (pos, q, k, inv, mscale, index, 64, True),
                          test_utils=("test_schema", "test_faketensor"))


def test_pure_python_path_when_extension_is_absent(tmp_path):
    """With yarn_vllm._C unimportable the package still imports and rotates correctly,
    per token too, against the paper's float64 form (this file's rope_complex)."""
    code = (
        "import sys; sys.modules['yarn_vllm._C'] = None\n"
        f"sys.path.insert(0, {os.path.join(REPO, 'tests')!r})\n"
        "import torch\n"
        "from test_rotary_op import make_case, rope_complex, TOL\n"
        "from yarn_vllm import ops\n"
        "assert not ops.HAS_EXTENSION and not ops.extension_supports(torch.device('cpu'))\n"
        "pos, q, k, inv, ms, idx = make_case(10, 64, 64, torch.float32, scales=4)\n"
        "want = rope_complex(q.view(10, -1, 64), pos, inv[idx.long()], ms[idx.long()], True)\n"
        "ops.rotary_embedding_(pos, q, k, inv, ms, 64, True, scale_index=idx)\n"
        "torch.testing.assert_close(q.view(10, -1, 64).double(), want, **TOL[torch.float32])\n"
        "print('pure-python ok')\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert "pure-python ok" in out.stdout


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not on PATH")
def test_cuda_kernel_compiles_without_torch_headers(tmp_path):
    """The .cu file includes no torch header, so nvcc alone compiles it, GPU or not."""
    src = os.path.join(REPO, "csrc", "rotary_cuda_kernel.cu")
    includes = [line for line in open(src) if line.startswith("#include")]
    assert includes and not any(h in line for line in includes for h in ("torch", "ATen", "c10"))
    out = subprocess.run(["nvcc", "-std=c++17", "-c", src, "-o", str(tmp_path / "k.o")],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "k.o").stat().st_size > 0


needs_cuda_op = pytest.mark.skipif(
    not torch.cuda.is_available() or not ops.extension_supports(torch.device("cuda")),
    reason="needs a GPU and the CUDA build of yarn_vllm._C")


@pytest.mark.gpu
@needs_cuda_op
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens", TOKENS)
@pytest.mark.parametrize("head_size,rotary_dim", SHAPES)
@pytest.mark.parametrize("is_neox", [True, False])
@pytest.mark.parametrize("scales", [1, len(FACTORS)])
def test_cuda_kernel_matches_reference(dtype, tokens, head_size, rotary_dim, is_neox, scales):
    check(op, tokens, head_size, rotary_dim, dtype, is_neox, device="cuda", scales=scales)


@pytest.mark.gpu
@needs_cuda_op
def test_cuda_kernel_clamps_a_bad_scale_index():
    """The CUDA launcher reads no value on the host; a bad index reads a valid row."""
    pos, q, k, inv, mscale, index = make_case(16, 64, 64, torch.float32, "cuda", scales=4)
    index[3], index[4] = 99, -7
    op(pos, q, k, inv, mscale, index, 64, True)
    clamped = index.clamp(0, 3)
    ref = expected(make_case(16, 64, 64, torch.float32, scales=4)[1], pos, inv, mscale, clamped,
                   64, True)
    torch.testing.assert_close(q.view_as(ref).cpu(), ref, **TOL[torch.float32])


@pytest.mark.parametrize("use_extension", [True, False])
@pytest.mark.parametrize("scales", [1, len(FACTORS)], ids=["static", "per_token"])
def test_torch_compile_fullgraph(use_extension, scales, monkeypatch):
    """vLLM compiles the model with Dynamo by default: the op must trace in one graph,
    and give the paper's rotation (rope_complex, independent of both paths)."""
    if use_extension and not ops.HAS_EXTENSION:
        pytest.skip("yarn_vllm._C not built")
    monkeypatch.setitem(ops._SUPPORTED_DEVICE_TYPES, "cpu", use_extension and ops.HAS_EXTENSION)
    pos, q, k, inv, mscale, index = make_case(37, 64, 64, torch.float32, scales=scales)
    rows = torch.zeros(37, dtype=torch.long) if index is None else index.long()

    def layer(pos, q, k):
        ops.rotary_embedding_(pos, q, k, inv, mscale, 64, True, scale_index=index)
        return q, k

    torch._dynamo.reset()
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    for got, x in zip(compiled(pos, q.clone(), k.clone()), (q, k)):
        want = rope_complex(x.view(37, -1, 64), pos, inv[rows], mscale[rows], True)
        torch.testing.assert_close(got.view(37, -1, 64).double(), want, **TOL[torch.float32])


@needs_ext
@pytest.mark.parametrize("dtype", DTYPES)
def test_nan_and_inf_propagate(dtype):
    """A NaN or inf in q stays non-finite (the vectorised bf16 store skips a NaN test)."""
    pos, q, k, inv, mscale, _ = make_case(16, 64, 64, dtype)
    q[3, 5] = float("nan")
    q[7, 40] = float("inf")
    ops.rotary_embedding_(pos, q, k, inv, mscale, 64, True)
    heads = q.view(16, -1, 64)
    assert heads[3, 0].isnan().any() and not heads[3, 1:].isnan().any()
    assert not heads[7, 0].isfinite().all()
    assert heads[[0, 1, 2, 4, 5, 6]].isfinite().all()
