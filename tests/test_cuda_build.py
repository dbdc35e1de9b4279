"""The CUDA build and its interface to vLLM's CUDA build, on a machine without a GPU.

Runs benchmarks/cuda_build_check.sh once per module. It needs the side environment
.venv-cuda (CUDA torch and vllm==0.32.0; `benchmarks/cuda_build_check.sh --env-only`
makes it, several GB) and skips only when that is missing. 3 to 11 minutes on 2 shared
cores when csrc/ changed since the last build, about 2 minutes otherwise.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SIDE_ENV = ROOT / ".venv-cuda"

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not (SIDE_ENV / "bin" / "python").exists(),
                       reason="no .venv-cuda (benchmarks/cuda_build_check.sh --env-only)"),
]

# Checks that must be present and pass; a check that silently stops running fails here.
VLLM_CHECKS = (
    "current_platform is CUDA",
    "every yarn_vllm module imports under vLLM's CUDA build",
    "with the plugin, vLLM chooses as before for a model without YaRN",
    "entry point registered the rotary layer as plugin.py documents",
    "entry point wrapped CudaPlatform's hooks",
    "entry point registered AttentionBackendEnum.CUSTOM",
    "get_rope (static) hands out the class plugin.py promises",
    "get_rope (dynamic) hands out the class plugin.py promises",
    "dynamic model on CUDA: config hook selects CUSTOM, keeps chunked prefill and APC",
    "request mode on CUDA: vLLM's own choices (backend, chunked prefill, APC, graphs)",
    "request mode hooks both GPU model runners (V1 and V2)",
    "CudaPlatform.get_attn_backend_cls(CUSTOM) answers our backend",
    "vLLM's selector resolves CUSTOM to our class",
    "KV-cache layout is head-major with contiguous blocks",
    "do_kv_cache_update + split_kv_cache round-trip through vLLM's KV view",
    "metadata builder and CUDA graphs",
    "builder's GPU branch hands the kernels per-sequence tensors",
)


@pytest.fixture(scope="module")
def build_check():
    out = ROOT / "bench_results" / "cuda_build"  # kept between runs: the build is reused
    proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "cuda_build_check.sh")],
                          env={**os.environ, "OUT": str(out)}, capture_output=True, text=True,
                          timeout=1800)
    print(proc.stdout[-6000:], proc.stderr[-3000:])
    return proc, out


def _checks(out: Path, part: str) -> dict[str, dict]:
    report = out / f"{part}.json"
    assert report.exists(), f"{part} check wrote no report"
    return {c["check"]: c for c in json.loads(report.read_text())["checks"]}


def test_every_cuda_source_compiles_and_links(build_check):
    proc, out = build_check
    compiled = set(re.findall(r"^build: compile: \S+ (\S+)", proc.stdout, re.M))
    cuda_sources = {f"csrc/{p.name}" for p in (out / "tree" / "csrc").iterdir()
                    if p.suffix == ".cu" or p.name.endswith("_cuda.cpp")}
    assert cuda_sources and cuda_sources <= compiled, proc.stdout[-3000:]
    assert "not compiled and linked" not in proc.stdout
    assert list((out / "tree" / "yarn_vllm").glob("_C*.so"))


def test_every_op_has_its_kernels(build_check):
    _, out = build_check
    checks = _checks(out, "ops")
    for op in ("rotary_embedding", "paged_attention"):
        for key in ("CPU", "CUDA", "Meta"):
            assert checks[f"{op}: {key} kernel"]["ok"], checks[f"{op}: {key} kernel"]
    failed = [c for c in checks.values() if not c["ok"]]
    assert not failed, failed


def test_vllm_cuda_interface(build_check):
    _, out = build_check
    checks = _checks(out, "vllm")
    missing = [name for name in VLLM_CHECKS if name not in checks]
    failed = [c for c in checks.values() if not c["ok"]]
    assert not missing and not failed, (missing, failed)


def test_script_passes(build_check):
    proc, _ = build_check
    assert proc.returncode == 0 and "all passed" in proc.stdout, proc.stdout[-3000:]
