"""Fixtures for the benchmark, sweep and replica tests: small Ray clusters on loopback."""

from __future__ import annotations

import os

import pytest

# Before any `import ray`: Ray then keeps every address it starts or dials at 127.0.0.1
# instead of this machine's routable one (see two_nodes.py)
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"


@pytest.fixture(scope="module")
def ray_cluster():
    """A local Ray cluster of 2 CPUs (no dashboard), shared by a module's tests; per module,
    so that the two-node tests (test_cluster.py) can have a cluster of their own."""
    import ray

    # Ray's memory monitor kills the newest worker when the node passes 95% memory; on this
    # shared test machine that is someone else's engine's doing, not a fault under test
    os.environ.setdefault("RAY_memory_monitor_refresh_ms", "0")
    os.environ.setdefault("RAY_raylet_start_wait_time_s", "300")  # slow starts under load
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             configure_logging=False, _node_ip_address="127.0.0.1")
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def two_node_cluster(tmp_path_factory):
    """Two Ray nodes on 127.0.0.1 of 1 CPU each ("node_a", "node_b" resources); yields
    (address, model): `model` is a folder that exists on node a only."""
    from .two_nodes import two_nodes

    hidden = tmp_path_factory.mktemp("on_node_a_only")
    model = hidden / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    with two_nodes(str(hidden)) as address:
        yield address, str(model)
