"""The CPU rotary kernel built for each instruction set it has a path for.

The extension is built with -march=native, so a machine runs only its own path (here
AVX-512). This compiles csrc/rotary_cpu_kernel.h again for AVX2 alone (the 8-lane
rotation and the two 4-lane reductions of sincos8) and for plain x86-64 (scalar libm),
and checks them against the extension and against float64, huge angles included.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import subprocess

import pytest
import torch

from conftest import TOL
from test_rotary_op import HUGE_POSITIONS, rope_complex
from yarn_vllm import ops

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ISAS = {"avx2": "-march=x86-64-v3", "scalar": "-march=x86-64"}
SHIM = r"""
#include "rotary_cpu_kernel.h"
template <typename T>
static void run(int64_t T_, const int64_t* pos, const int32_t* index, void* q, int heads, int d,
                int rotary_dim, const float* inv, const float* ms, int neox) {
  const yarn::RotaryShape sh{T_, heads, 0, d, rotary_dim, int64_t{heads} * d, d, 0, 0};
  yarn::rotary_cpu<T>(0, T_, pos, index, static_cast<T*>(q), nullptr, inv, ms, sh, neox != 0);
}
extern "C" void rope_f32(int64_t t, const int64_t* p, const int32_t* i, void* q, int h, int d,
                         int r, const float* f, const float* m, int n) {
  run<float>(t, p, i, q, h, d, r, f, m, n);
}
extern "C" void rope_bf16(int64_t t, const int64_t* p, const int32_t* i, void* q, int h, int d,
                          int r, const float* f, const float* m, int n) {
  run<yarn::bf16>(t, p, i, q, h, d, r, f, m, n);
}
"""

pytestmark = pytest.mark.skipif(shutil.which("g++") is None, reason="g++ not on PATH")


def build_isas(tmp, source: str, isas: dict, std: str = "c++17") -> dict:
    """{isa: ctypes.CDLL}: `source` (a shim over csrc/ headers) compiled once per -march
    flag of `isas` ({name: flag}) into the folder `tmp`."""
    (tmp / "shim.cpp").write_text(source)
    libs = {}
    for isa, flag in isas.items():
        lib = tmp / f"shim_{isa}.so"
        out = subprocess.run(["g++", f"-std={std}", "-O3", "-fno-math-errno", flag, "-shared",
                              "-fPIC", "-I", os.path.join(REPO, "csrc"), str(tmp / "shim.cpp"),
                              "-o", str(lib)], capture_output=True, text=True)
        assert out.returncode == 0, out.stderr
        libs[isa] = ctypes.CDLL(str(lib))
    return libs


@pytest.fixture(scope="module")
def kernels(tmp_path_factory):
    return build_isas(tmp_path_factory.mktemp("rotary_isa"), SHIM, ISAS)


def rotate(lib, positions, x, inv_freq, mscale, index, head_size, is_neox):
    """x: [T, H * head_size] fp32 or bf16, rotated in place by `lib`'s kernel."""
    fn = lib.rope_f32 if x.dtype == torch.float32 else lib.rope_bf16
    ptr = lambda t: ctypes.c_void_p(t.data_ptr())  # noqa: E731
    fn(ctypes.c_int64(x.shape[0]), ptr(positions), None if index is None else ptr(index), ptr(x),
       x.shape[1] // head_size, head_size, 2 * inv_freq.shape[1], ptr(inv_freq), ptr(mscale),
       int(is_neox))


def case(tokens, head_size, rotary_dim, dtype, scales=4):
    g = torch.Generator().manual_seed(head_size + rotary_dim)
    inv = torch.rand(scales, rotary_dim // 2, generator=g) ** 4
    mscale = 1 + torch.rand(scales, generator=g)
    pos = torch.randint(0, 1 << 20, (tokens,), generator=g)
    index = torch.randint(0, scales, (tokens,), generator=g, dtype=torch.int32)
    return pos, torch.randn(tokens, 3 * head_size, generator=g).to(dtype), inv, mscale, index


@pytest.mark.skipif(not ops.HAS_EXTENSION, reason="yarn_vllm._C not built")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("head_size,rotary_dim", [(128, 128), (80, 20), (64, 28)])
@pytest.mark.parametrize("is_neox", [True, False])
def test_every_isa_agrees(kernels, dtype, head_size, rotary_dim, is_neox):
    """AVX2's NeoX path gives the extension's bits exactly (the same per-lane intrinsics
    at another width; GPT-J is a loop the compiler vectorises, and may contract into FMAs
    differently per width); every build agrees with the fp32 reference at its tolerance."""
    pos, x, inv, mscale, index = case(301, head_size, rotary_dim, dtype)
    native = x.clone()
    ops.rotary_embedding_(pos, native, None, inv, mscale, head_size, is_neox, scale_index=index)
    for isa, lib in kernels.items():
        got = x.clone()
        rotate(lib, pos, got, inv, mscale, index, head_size, is_neox)
        if isa == "avx2" and is_neox:
            assert torch.equal(got, native)
        rows = index.long()
        ref = ops.rotary_reference(x.view(301, 3, head_size), pos, inv[rows], mscale[rows],
                                   is_neox)
        torch.testing.assert_close(got.view_as(ref).float(), ref, **TOL[dtype])


@pytest.mark.parametrize("isa", list(ISAS))
def test_huge_angles_against_float64(kernels, isa):
    """sincos8's quadrant is taken in double: no int32 overflow past ~3.4e9 rad, and
    libm takes over past 2^50 rad."""
    inv = torch.tensor([[1.0, 0.999, 0.5, 1 / 3, 0.1, 1e-4, 2.0, 0.75]])
    x = torch.randn(8, 16, generator=torch.Generator().manual_seed(0))
    got = x.clone()
    rotate(kernels[isa], HUGE_POSITIONS, got, inv, torch.ones(1), None, 16, True)
    want = rope_complex(x[:, None], HUGE_POSITIONS, inv.expand(8, -1), torch.ones(8), True)
    torch.testing.assert_close(got.double(), want[:, 0], **TOL[torch.float32])
