"""Build and call the CUDA paged decode launcher emulated on the CPU (emu_shim.h).

`build()` compiles csrc/paged_attention_cuda_kernel.cu with g++ against the shim,
plus emu_harness.cpp, which runs the launcher's own contract checks and marshalling
(csrc/paged_attention_checks.h, paged_attention_cuda.h), once per process. `Emulator`
then takes the op's arguments, in the op's order, as torch CPU tensors.
"""

from __future__ import annotations

import atexit
import ctypes
import functools
import os
import re
import shutil
import subprocess
import tempfile

import torch

TESTS = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REPO = os.path.dirname(TESTS)
ARG_DTYPES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2, torch.int32: 3,
              torch.int64: 4}  # yarn::ArgDType


class EmuTensor(ctypes.Structure):
    _fields_ = [("present", ctypes.c_int32), ("dtype", ctypes.c_int32), ("dim", ctypes.c_int32),
                ("pad", ctypes.c_int32), ("size", ctypes.c_int64 * 4),
                ("stride", ctypes.c_int64 * 4), ("data", ctypes.c_void_p),
                ("dtype_label", ctypes.c_char_p)]


def _describe(t: torch.Tensor | None) -> EmuTensor:
    if t is None:
        return EmuTensor()
    dims = min(t.dim(), 4)
    # torch's own name (c10::toString) of a dtype the contract does not know, e.g. "Double"
    label = None if t.dtype in ARG_DTYPES else t.type().split(".")[-1][:-len("Tensor")].encode()
    return EmuTensor(1, ARG_DTYPES.get(t.dtype, 5), t.dim() if t.dim() <= 4 else 5, 0,
                     (ctypes.c_int64 * 4)(*t.shape[:dims]), (ctypes.c_int64 * 4)(*t.stride()[:dims]),
                     t.data_ptr(), label)


@functools.cache
def build() -> ctypes.CDLL:
    """Compiles the emulation (about 10 s) into a fresh temporary folder and loads it."""
    tmp_dir = tempfile.mkdtemp(prefix="yarn_cuda_emu_")
    atexit.register(shutil.rmtree, tmp_dir, True)
    src = open(os.path.join(REPO, "csrc", "paged_attention_cuda_kernel.cu")).read()
    src = re.sub(r"#include <cuda[^>]*>\n", "", src)
    src = src.replace('#include "paged_attention_cuda.h"',
                      '#include "emu_shim.h"\n#include "paged_attention_cuda.h"')
    src = re.sub(r"([\w:]+(?:<[^<>]*>)?)<<<(.*?),\s*(\w+),\s*0,\s*stream>>>\((.*?)\);",
                 r"emu_launch(\2, dim3(\3), [&] { \1(\4); });", src)
    assert "<<<" not in src, "a kernel launch the rewrite does not know"
    with open(os.path.join(tmp_dir, "kernel_emu.cpp"), "w") as f:
        f.write(src)
    lib = os.path.join(tmp_dir, "libemu.so")
    here = os.path.join(TESTS, "cuda_emu")
    out = subprocess.run(
        ["g++", "-std=c++20", "-O1", "-pthread", "-shared", "-fPIC", "-I", os.path.join(REPO, "csrc"),
         "-I", here, "-I", str(tmp_dir), os.path.join(here, "emu_harness.cpp"), "-o", lib],
        capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    return ctypes.CDLL(lib)


class Emulator:
    """The emulated CUDA paged_attention op: same arguments; RuntimeError on a refusal."""

    def __init__(self, lib: ctypes.CDLL, num_sms: int = 1000):
        self.lib = lib
        self.num_sms = num_sms  # many SMs: long contexts split over CTAs; 1: no split
        self.splits = 0

    def __call__(self, out, query, key_cache, value_cache, block_table, seq_lens,
                 query_start_loc, inv_freq, logit_scale, cos_sin, cos_sin_start, is_neox) -> None:
        args = (out, query, key_cache, value_cache, block_table, seq_lens, query_start_loc,
                inv_freq, logit_scale, cos_sin, cos_sin_start)
        tensors = (EmuTensor * 11)(*map(_describe, args))
        error = ctypes.create_string_buffer(512)
        self.splits = self.lib.emu_paged_decode(tensors, int(is_neox), self.num_sms, error, 512)
        if self.splits == 0:
            raise RuntimeError(error.value.decode())
