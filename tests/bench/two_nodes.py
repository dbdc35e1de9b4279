"""A Ray cluster of two nodes on this machine, both on 127.0.0.1, for the multi-node tests.

Each node is a `ray start --block` process group of our own (so teardown kills exactly
what we started; `ray stop` would stop every Ray on the machine), with its own custom
resource ("node_a", "node_b") and a private temp dir, so a plain `ray.init()` elsewhere on
this machine never finds it. Node b runs in a mount namespace of its own where `hidden`
is an empty tmpfs: what lies inside it exists on node a only, as a model folder copied to
one machine of a real cluster would.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time

# Ray turns --node-ip-address=127.0.0.1 into this machine's routable address unless it
# believes multi-node clusters are off (its macOS/Windows switch); then every process it
# starts, drivers and workers included, uses loopback only. `ray start` for a second node
# refuses to run with that switch, so it runs through `main` below.
LOOPBACK_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}


def auth_env() -> dict:
    """The nodes' authentication mode, the one a driver here picks for itself. Ray 2.60
    turns token auth on for a head and a driver (not a joining node, which the head then
    refuses: "InvalidAuthToken") when ~/.ray/auth_token exists and RAY_AUTH_MODE is unset."""
    has_token = os.path.exists(os.path.expanduser("~/.ray/auth_token"))
    return {"RAY_AUTH_MODE": os.environ.get("RAY_AUTH_MODE") or
            ("token" if has_token else "disabled")}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(args: list[str], log: str, hidden: str | None = None) -> subprocess.Popen:
    cmd = [sys.executable, __file__, "start", "--block", "--node-ip-address=127.0.0.1",
           "--disable-usage-stats", *args]
    if hidden is not None:  # node b: `hidden` is an empty tmpfs in its own mount namespace
        cmd = ["unshare", "--mount", "--propagation", "private", "sh", "-c",
               f'mount -t tmpfs tmpfs "{hidden}" && exec "$@"', "sh", *cmd]
    env = {**os.environ, **LOOPBACK_ENV, **auth_env(), "RAY_memory_monitor_refresh_ms": "0",
           "RAY_raylet_start_wait_time_s": "300"}
    return subprocess.Popen(cmd, stdout=open(log, "w"), stderr=subprocess.STDOUT,
                            start_new_session=True, env=env)


@contextlib.contextmanager
def two_nodes(hidden: str, cpus_per_node: int = 1, timeout_s: float = 180):
    """Yields the head's address once both nodes are alive; `hidden` must exist."""
    os.environ.update(auth_env())  # this process, the driver, in the nodes' mode ...
    import ray
    from ray._raylet import Config

    Config.initialize("")  # ... read again if Ray was imported before (as Ray does itself)

    tmp = tempfile.mkdtemp(prefix="yvr", dir="/tmp")  # short: Ray's socket paths have a limit
    port = _free_port()
    procs = [_start(["--head", f"--port={port}", f"--num-cpus={cpus_per_node}",
                     '--resources={"node_a": 1}', "--include-dashboard=false",
                     f"--temp-dir={tmp}", f"--ray-client-server-port={_free_port()}"],
                    os.path.join(tmp, "head.log"))]
    address = f"127.0.0.1:{port}"
    try:
        procs.append(_start([f"--address={address}", f"--num-cpus={cpus_per_node}",
                             '--resources={"node_b": 1}'], os.path.join(tmp, "node_b.log"),
                            hidden=hidden))
        t0 = time.monotonic()
        while True:
            if any(p.poll() is not None for p in procs):
                raise RuntimeError("a Ray node exited at start: " + " ".join(
                    open(os.path.join(tmp, f)).read()[-2000:]
                    for f in ("head.log", "node_b.log") if os.path.exists(os.path.join(tmp, f))))
            try:
                if not ray.is_initialized():
                    ray.init(address=address, _node_ip_address="127.0.0.1",
                             log_to_driver=False, configure_logging=False)
                if len([n for n in ray.nodes() if n["Alive"]]) == 2:
                    break
            except ConnectionError:
                pass
            if time.monotonic() - t0 > timeout_s:
                raise TimeoutError(f"two Ray nodes not up in {timeout_s} s (logs in {tmp})")
            time.sleep(1)
        yield address
    finally:
        ray.shutdown()
        for p in reversed(procs):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGTERM)
        for p in procs:
            try:
                p.wait(5)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()


def main() -> None:
    """`ray start ARGS`, with this node's address kept at 127.0.0.1 and multi-node allowed."""
    import ray._private.ray_constants as constants
    import ray._private.services as services
    from ray.scripts.scripts import main as ray_main

    constants.ENABLE_RAY_CLUSTER = True  # a second node may join: both are on loopback
    services.get_node_ip_address = lambda address=None: "127.0.0.1"
    services.resolve_ip_for_localhost = lambda host: host
    sys.argv = ["ray", *sys.argv[1:]]
    ray_main()


if __name__ == "__main__":
    main()
