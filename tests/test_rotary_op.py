"""The rotary op (CPU kernel, PyTorch path, CUDA kernel) against the fp32 reference."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest
import torch

from yarn_vllm import ops, yarn_math
from conftest import TOL

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
TOKENS = [1, 7, 989, 4099]
# (head_size, rotary_dim): full, partial, and (80, 20) whose rotary_dim/2 = 10 runs
# the kernels' scalar tails after the 8- and 4-wide vector loops
SHAPES = [(64, 64), (128, 128), (128, 64), (80, 32), (80, 20)]
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def make_case(tokens, head_size, rotary_dim, dtype, device="cpu", heads_q=9, heads_k=3,
              factor=4.0, original=2048):
    gen = torch.Generator().manual_seed(tokens * 31 + head_size)
    inv = yarn_math.yarn_inv_freq(rotary_dim, 1e4, factor, original).to(device)
    # positions past factor x original too: the on-the-fly op has no table to overrun
    pos = torch.randint(0, int(factor * original) + 4096, (tokens,), generator=gen).to(device)
    q = torch.randn(tokens, heads_q * head_size, generator=gen).to(device, dtype)
    k = torch.randn(tokens, heads_k * head_size, generator=gen).to(device, dtype)
    return pos, q, k, inv, yarn_math.yarn_mscale(factor)


def expected(x, pos, inv, mscale, head_size, is_neox):
    return ops.rotary_reference(x.view(x.shape[0], -1, head_size), pos, inv, mscale, is_neox)


def check(impl, tokens, head_size, rotary_dim, dtype, is_neox, device="cpu"):
    pos, q, k, inv, mscale = make_case(tokens, head_size, rotary_dim, dtype, device)
    ref_q = expected(q, pos, inv, mscale, head_size, is_neox)
    ref_k = expected(k, pos, inv, mscale, head_size, is_neox)
    impl(pos, q, k, inv, mscale, head_size, is_neox)
    torch.testing.assert_close(q.view_as(ref_q).float(), ref_q, **TOL[dtype])
    torch.testing.assert_close(k.view_as(ref_k).float(), ref_k, **TOL[dtype])


needs_ext = pytest.mark.skipif(not ops.HAS_EXTENSION, reason="yarn_vllm._C not built")


@needs_ext
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens", TOKENS)
@pytest.mark.parametrize("head_size,rotary_dim", SHAPES)
@pytest.mark.parametrize("is_neox", [True, False])
def test_cpu_kernel_matches_reference(dtype, tokens, head_size, rotary_dim, is_neox):
    def op(pos, q, k, inv, mscale, head_size, is_neox):
        torch.ops.yarn_vllm.rotary_embedding(pos, q, k, inv, None, mscale, head_size, is_neox)
    check(op, tokens, head_size, rotary_dim, dtype, is_neox)


@pytest.mark.parametrize("head_size,rotary_dim", SHAPES)
@pytest.mark.parametrize("is_neox", [True, False])
def test_reference_matches_vllm_forward_static(head_size, rotary_dim, is_neox):
    """Our fp32 reference (and so the PyTorch fallback, which is it) against vLLM's own
    PyTorch rotary implementation fed the same YaRN cos/sin table: an independent check
    of the pairing, partial rotary and mscale conventions."""
    from vllm.model_executor.layers.rotary_embedding.base import RotaryEmbedding

    pos, q, k, inv, mscale = make_case(989, head_size, rotary_dim, torch.float32)
    angles = torch.outer(torch.arange(int(pos.max()) + 1, dtype=torch.float32), inv)
    table = torch.cat((angles.cos(), angles.sin()), -1) * mscale
    q_v, k_v = RotaryEmbedding.forward_static(pos, q.clone(), k.clone(), head_size, rotary_dim,
                                              table, is_neox)
    q_t, k_t = q.clone(), k.clone()
    ops.rotary_embedding_torch_(pos, q_t, k_t, inv, mscale, head_size, is_neox)
    torch.testing.assert_close(q_t, q_v, **TOL[torch.float32])
    torch.testing.assert_close(k_t, k_v, **TOL[torch.float32])


@needs_ext
@pytest.mark.parametrize("dtype", DTYPES)
def test_table_variant_matches_on_the_fly(dtype):
    pos, q, k, inv, mscale = make_case(989, 128, 128, dtype)
    table = torch.outer(torch.arange(int(pos.max()) + 1, dtype=torch.float32), inv)
    table = torch.cat((table.cos(), table.sin()), -1)
    q2, k2 = q.clone(), k.clone()
    ops.rotary_embedding_(pos, q, k, inv, mscale, 128, True)
    ops.rotary_embedding_(pos, q2, k2, inv, mscale, 128, True, cos_sin_table=table)
    # both round the same fp32 values; cos/sin differ by fp32 noise, so at most 1 ulp
    tol = {"rtol": 2 * TOL[dtype]["rtol"], "atol": TOL[dtype]["atol"]}
    torch.testing.assert_close(q2.float(), q.float(), **tol)
    torch.testing.assert_close(k2.float(), k.float(), **tol)


@needs_ext
def test_table_rows_past_the_end_are_computed():
    """Positions beyond the table are computed on the fly, never read out of bounds."""
    pos, q, k, inv, mscale = make_case(64, 64, 64, torch.float32)
    short = torch.outer(torch.arange(100, dtype=torch.float32), inv)
    table = torch.cat((short.cos(), short.sin()), -1)
    assert (pos >= 100).any()
    ref = expected(q, pos, inv, mscale, 64, True)
    ops.rotary_embedding_(pos, q, None, inv, mscale, 64, True, cos_sin_table=table)
    torch.testing.assert_close(q.view_as(ref), ref, **TOL[torch.float32])


@needs_ext
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_positions_up_to_a_million(dtype):
    """On-the-fly cos/sin keep fp32 accuracy at 1M-token positions (range reduction)."""
    tokens = 257
    inv = yarn_math.yarn_inv_freq(128, 1e6, 32.0, 32768)
    pos = torch.linspace(900_000, 1_048_575, tokens).long()
    q = torch.randn(tokens, 4 * 128, generator=torch.Generator().manual_seed(1)).to(dtype)
    ref = expected(q, pos, inv, 1.3, 128, True)
    ops.rotary_embedding_(pos, q, None, inv, 1.3, 128, True)
    # fp32 angles near 1e6 rad carry ~0.06 rad of rounding in both; cos/sin of the
    # same fp32 angle must still agree to fp32 precision
    torch.testing.assert_close(q.view_as(ref).float(), ref, **TOL[dtype])


@needs_ext
def test_strided_views_from_fused_qkv():
    """vLLM hands q and k as column slices of one [T, (Hq + 2 Hk) D] tensor."""
    pos, q, k, inv, mscale = make_case(99, 64, 64, torch.bfloat16)
    v = torch.randn(99, k.shape[1]).bfloat16()
    qkv = torch.cat((q, k, v), dim=1)
    qs, ks, vs = qkv.split([q.shape[1], k.shape[1], v.shape[1]], dim=1)
    assert not qs.is_contiguous()
    ops.rotary_embedding_(pos, qs, ks, inv, mscale, 64, True)
    ops.rotary_embedding_(pos, q, k, inv, mscale, 64, True)
    assert torch.equal(qs, q) and torch.equal(ks, k) and torch.equal(vs, v)


@needs_ext
def test_three_dim_and_no_key():
    pos, q, _, inv, mscale = make_case(19, 64, 64, torch.float32)
    q3 = q.view(19, 9, 64).clone()
    ops.rotary_embedding_(pos, q3, None, inv, mscale, 64, False)
    torch.testing.assert_close(q3, expected(q, pos, inv, mscale, 64, False), **TOL[torch.float32])


@needs_ext
@pytest.mark.parametrize("bad,match", [
    (lambda p, q, k, i: (p.int(), q, k, i), "positions: expected int64"),
    (lambda p, q, k, i: (p, q, k, i.double()), "inv_freq"),
    (lambda p, q, k, i: (p, q[:, :-1], k, i), "not a multiple of head_size"),
    (lambda p, q, k, i: (p, q, k.half(), i), "key: dtype"),
    (lambda p, q, k, i: (p[:-1], q, k, i), "positions"),
])
def test_kernel_rejects_bad_arguments(bad, match):
    pos, q, k, inv, _ = make_case(8, 64, 64, torch.bfloat16)
    p, q, k, i = bad(pos, q, k, inv)
    with pytest.raises(RuntimeError, match=match):
        torch.ops.yarn_vllm.rotary_embedding(p, q, k, i, None, 1.0, 64, True)


@needs_ext
def test_opcheck_schema_and_fake():
    """The schema's aliasing and the fake (meta) twin agree with the kernel (torch.compile)."""
    pos, q, k, inv, mscale = make_case(7, 64, 64, torch.bfloat16)
    torch.library.opcheck(torch.ops.yarn_vllm.rotary_embedding.default,
                          (pos, q, k, inv, None, mscale, 64, True),
                          test_utils=("test_schema", "test_faketensor"))


def test_pure_python_path_when_extension_is_absent(tmp_path):
    """With yarn_vllm._C unimportable the package still imports and rotates correctly."""
    code = (
        "import sys; sys.modules['yarn_vllm._C'] = None\n"
        "import torch\n"
        "from yarn_vllm import ops, yarn_math\n"
        "assert not ops.HAS_EXTENSION and not ops.extension_supports(torch.device('cpu'))\n"
        "inv = yarn_math.yarn_inv_freq(64, 1e4, 4.0, 1024)\n"
        "pos = torch.arange(5000, 5010); q = torch.randn(10, 128)\n"
        "ref = ops.rotary_reference(q.view(10, 2, 64), pos, inv, 1.2)\n"
        "ops.rotary_embedding_(pos, q, None, inv, 1.2, 64, True)\n"
        "torch.testing.assert_close(q.view(10, 2, 64), ref)\n"
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


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or not ops.extension_supports(
    torch.device("cuda")), reason="needs a GPU and the CUDA build of yarn_vllm._C")
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens", TOKENS)
@pytest.mark.parametrize("head_size,rotary_dim", SHAPES)
@pytest.mark.parametrize("is_neox", [True, False])
def test_cuda_kernel_matches_reference(dtype, tokens, head_size, rotary_dim, is_neox):
    check(ops.rotary_embedding_, tokens, head_size, rotary_dim, dtype, is_neox, device="cuda")


@pytest.mark.parametrize("use_extension", [True, False])
def test_torch_compile_fullgraph(use_extension, monkeypatch):
    """vLLM compiles the model with Dynamo by default: the op must trace in one graph."""
    if use_extension and not ops.HAS_EXTENSION:
        pytest.skip("yarn_vllm._C not built")
    monkeypatch.setitem(ops._SUPPORTED_DEVICE_TYPES, "cpu", use_extension and ops.HAS_EXTENSION)
    pos, q, k, inv, mscale = make_case(37, 64, 64, torch.float32)

    def layer(pos, q, k):
        ops.rotary_embedding_(pos, q, k, inv, mscale, 64, True)
        return q, k

    torch._dynamo.reset()
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    q_c, k_c = compiled(pos, q.clone(), k.clone())
    torch.testing.assert_close(q_c.view(37, -1, 64), expected(q, pos, inv, mscale, 64, True),
                               atol=1e-5, rtol=0)
    torch.testing.assert_close(k_c.view(37, -1, 64), expected(k, pos, inv, mscale, 64, True),
                               atol=1e-5, rtol=0)


@needs_ext
@pytest.mark.parametrize("dtype", DTYPES)
def test_nan_and_inf_propagate(dtype):
    """A NaN or inf in q stays non-finite (the vectorised bf16 store skips a NaN test)."""
    pos, q, k, inv, mscale = make_case(16, 64, 64, dtype)
    q[3, 5] = float("nan")
    q[7, 40] = float("inf")
    ops.rotary_embedding_(pos, q, k, inv, mscale, 64, True)
    heads = q.view(16, -1, 64)
    assert heads[3, 0].isnan().any() and not heads[3, 1:].isnan().any()
    assert not heads[7, 0].isfinite().all()
    assert heads[[0, 1, 2, 4, 5, 6]].isfinite().all()
