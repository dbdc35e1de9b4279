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
    for _ in range(warmup):
        if setup:
            setup()
        fn()
    times = []
    start = time.perf_counter()
    while len(times) < reps or time.perf_counter() - start < min_seconds:
        if setup:
            setup()
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append((time.perf_counter() - t0) * 1e3)
    return _quantiles(times)


def _quantiles(times: list[float]) -> dict:
    q = statistics.quantiles(times, n=10) if len(times) >= 2 else [times[0]] * 9
    return {"median": statistics.median(times), "p20": q[1], "p80": q[7], "n": len(times)}


def measure_interleaved(providers: dict, *, reps: int, warmup: int = 3, setup=None,
                        device: str = "cpu") -> dict:
    """Time each of `providers` (name -> fn) `reps` times, taking turns every repetition,
    so that load from other processes falls on all of them alike. Returns ms quantiles
    per name ({median, p20, p80, n}); `setup()` runs untimed before every call."""
    times = {name: [] for name in providers}
    for rep in range(warmup + reps):
        for name, fn in providers.items():
            if setup:
                setup()
            _sync(device)
            t0 = time.perf_counter()
            fn()
            _sync(device)
            if rep >= warmup:
                times[name].append((time.perf_counter() - t0) * 1e3)
    return {name: _quantiles(t) for name, t in times.items()}


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
