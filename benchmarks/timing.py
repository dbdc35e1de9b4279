"""Shared timing helpers for the benchmarks: median with p20/p80, device-synchronised."""

from __future__ import annotations

import json
import os
import platform
import statistics
import time

import torch


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def measure(fn, *, reps: int, warmup: int = 3, setup=None, device: str = "cpu",
            min_seconds: float = 0.0) -> dict:
    """Time `fn()` (after `setup()`, untimed) and return ms quantiles {median, p20, p80, n}."""
    return measure_interleaved({"fn": fn}, reps=reps, warmup=warmup, setup=setup, device=device,
                               min_seconds=min_seconds)["fn"]


def measure_interleaved(providers: dict, *, reps: int, warmup: int = 3, setup=None,
                        device: str = "cpu", min_seconds: float = 0.0,
                        clock=time.perf_counter) -> dict:
    """Time each of `providers` (name -> fn) at least `reps` times and `min_seconds` in all,
    taking turns every repetition, so that load from other processes falls on all of them
    alike; the turn order rotates, so that none always runs after the same neighbour (whose
    traffic leaves the caches in its own state). Returns ms quantiles per name ({median,
    p20, p80, n}); `setup()` runs untimed before every call. `clock`: wall time by default;
    time.thread_time counts only this thread's CPU time, which other processes' load on a
    shared machine leaves far less disturbed (valid for work on this thread alone)."""
    times = {name: [] for name in providers}
    names = list(providers)
    start = time.perf_counter()
    rep = 0
    while rep < warmup + reps or time.perf_counter() - start < min_seconds:
        for i in range(len(names)):
            name = names[(rep + i) % len(names)]
            fn = providers[name]
            if setup:
                setup()
            _sync(device)
            t0 = clock()
            fn()
            _sync(device)
            if rep >= warmup:
                times[name].append((clock() - t0) * 1e3)
        rep += 1
    return {name: _quantiles(t) for name, t in times.items()}


def _quantiles(times: list[float]) -> dict:
    q = statistics.quantiles(times, n=10) if len(times) >= 2 else [times[0]] * 9
    return {"median": statistics.median(times), "p20": q[1], "p80": q[7], "n": len(times)}


def environment() -> dict:
    """What the numbers were measured on."""
    env = {"torch": torch.__version__, "threads": torch.get_num_threads(),
           "cpu": platform.processor() or platform.machine(), "python": platform.python_version(),
           "loadavg_1m": os.getloadavg()[0]}
    if torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name()
    return env


def write_json(path: str, payload: dict) -> None:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as f:
        json.dump(payload, f, indent=2)
    print(f"wrote {path}")
