"""vLLM's CPU platform: the engine defaults we set there, and how cores are split over engines.

The defaults are declared once here and applied two ways: as `LLM(...)` keyword arguments
for offline engines (`apply_cpu_defaults`) and as server flags by `yarn-vllm serve`
(yarn_vllm.tools.cli.serve). Each was measured on this project's machines and each can be
overridden by passing the vLLM argument.
"""

from __future__ import annotations

import os

# Environment defaults for every CPU engine. The default fraction of node memory for the
# KV cache fails to start on small machines (9.6 GiB NUMA node 0 here), so a fixed 4 GiB.
CPU_ENV_DEFAULTS = {"VLLM_CPU_KVCACHE_SPACE": "4"}
# Offline engines only: there is no API server to keep a core for; on 2 cores an 8k
# prefill ran in 66 s with both cores, several times longer with one.
OFFLINE_CPU_ENV_DEFAULTS = {"VLLM_CPU_NUM_OF_RESERVED_CPU": "0"}
# Engine argument -> (its CPU default, the arguments that mean the user chose already).
# CPU graph compilation took over 2 minutes at start-up, hence eager mode.
EAGER = ("enforce_eager", True, ("enforce_eager", "compilation_config"))
# bf16 prefill was ~3x slower than fp32 on a CPU without native bf16.
FP32_WITHOUT_BF16 = ("dtype", "float32", ("dtype",))


def on_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def cpu_lacks_bf16() -> bool:
    """True on a CPU-only machine whose CPU has no native bf16 (no AVX512-BF16 or AMX)."""
    if on_cuda():
        return False
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return "avx512_bf16" not in flags and "amx_bf16" not in flags


def cpu_engine_defaults(given) -> dict:
    """The CPU default engine arguments (snake_case) not already chosen by the user.

    `given(name)` says whether the user passed engine argument `name` in any spelling.
    """
    out = {}
    for name, value, chosen_by in (EAGER, FP32_WITHOUT_BF16):
        if any(given(n) for n in chosen_by):
            continue
        if name == "dtype" and not cpu_lacks_bf16():
            continue
        out[name] = value
    return out


def apply_cpu_defaults(kwargs: dict) -> None:
    """Offline-job defaults for vLLM's CPU backend, in `kwargs` and os.environ (no-op on CUDA)."""
    if on_cuda():
        return
    for key, value in {**CPU_ENV_DEFAULTS, **OFFLINE_CPU_ENV_DEFAULTS}.items():
        os.environ.setdefault(key, value)
    kwargs.update(cpu_engine_defaults(lambda name: name in kwargs))


# ---- splitting work and cores ----------------------------------------------------------

def shards(n_items: int, n: int) -> list[range]:
    """Contiguous index ranges, `n` of them (empty ones dropped), sizes differing by <= 1."""
    size, extra = divmod(n_items, n)
    out, start = [], 0
    for i in range(n):
        stop = start + size + (i < extra)
        if stop > start:
            out.append(range(start, stop))
        start = stop
    return out


def core_groups(n: int, cores: list[int] | None = None, *, equal: bool = False
                ) -> list[list[int]] | None:
    """`n` disjoint contiguous groups of this process's cores (or `cores`); None if too few.

    Group sizes differ by at most one; `equal=True` leaves the remainder cores unused so
    that every group is the same size (tensor-parallel ranks wait for the slowest).
    """
    cores = sorted(cores if cores is not None else os.sched_getaffinity(0))
    if n > len(cores):
        return None
    if equal:
        cores = cores[:len(cores) // n * n]
    return [cores[s.start:s.stop] for s in shards(len(cores), n)]


def omp_bind(group: list[int]) -> str:
    """One group as VLLM_CPU_OMP_THREADS_BIND spells it: '0,1'."""
    return ",".join(map(str, group))
