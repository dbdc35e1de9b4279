"""Fixtures for the benchmark, sweep and replica tests: one small local Ray cluster."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def ray_cluster():
    """A local Ray cluster of 2 CPUs (no dashboard), shared by every test that needs one."""
    import os

    import ray

    # Ray's memory monitor kills the newest worker when the node passes 95% memory; on this
    # shared test machine that is someone else's engine's doing, not a fault under test
    os.environ.setdefault("RAY_memory_monitor_refresh_ms", "0")
    os.environ.setdefault("RAY_raylet_start_wait_time_s", "300")  # slow starts under load
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             configure_logging=False)
    yield ray
    ray.shutdown()
