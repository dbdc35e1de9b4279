"""A `yarn-vllm serve` process on loopback: start, wait until it answers, stop it and its children.

Used by the tests and examples/openai_client.py:

    with LocalServer("smollm2-135m", ["--factor", "2"]) as server:
        client = openai.OpenAI(base_url=server.base_url, api_key="none")
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (the OS picks it)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerExited(RuntimeError):
    """The server process ended before it was ready; the message holds its log's tail."""


class LocalServer:
    """`yarn-vllm serve MODEL ARGS --port P` in its own process group, on loopback: the
    host is left to `yarn-vllm serve`, whose default is 127.0.0.1.

    `stop()` ends the whole group (API server, engine core, workers): SIGTERM, then
    SIGKILL after `grace` seconds. The server's stdout and stderr go to `log_path`.
    """

    def __init__(self, model: str, args: list[str] = (), *, port: int | None = None,
                 env: dict | None = None, log_path: str | None = None):
        self.model, self.args = model, list(args)
        self.port = port or free_port()
        self.env = dict(os.environ if env is None else env)
        self.log_path = log_path or tempfile.mkstemp(prefix="yarn_vllm_serve_", suffix=".log")[1]
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def base_url(self) -> str:
        """The OpenAI API root, for `openai.OpenAI(base_url=...)`."""
        return self.url + "/v1"

    def start(self) -> "LocalServer":
        cmd = [sys.executable, "-m", "yarn_vllm.tools.cli", "serve", self.model, *self.args,
               "--port", str(self.port)]
        with open(self.log_path, "w") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=self.env,
                                         start_new_session=True)  # its own process group
        return self

    def log(self) -> str:
        with open(self.log_path, errors="replace") as f:
            return f.read()

    def wait_ready(self, timeout: float = 900.0, poll: float = 2.0) -> "LocalServer":
        """Block until GET /health answers 200; raise if the process exits or time runs out."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise ServerExited(f"yarn-vllm serve exited with {self.proc.returncode} before "
                                   f"it was ready; log tail:\n{self.log()[-4000:]}")
            try:
                with urllib.request.urlopen(f"{self.url}/health",
                                            timeout=5) as r:
                    if r.status == 200:
                        return self
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
                pass
            time.sleep(poll)
        self.stop()
        raise TimeoutError(f"yarn-vllm serve was not ready after {timeout:.0f} s; log tail:\n"
                           f"{self.log()[-4000:]}")

    def stop(self, grace: float = 30.0) -> None:
        if self.proc is None or self.proc.poll() is not None and not self._group_alive():
            return
        self._signal_group(signal.SIGTERM)
        try:
            self.proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            pass
        self._signal_group(signal.SIGKILL)  # stragglers: engine core, workers
        self.proc.wait(timeout=grace)

    def _group_alive(self) -> bool:
        try:
            os.killpg(self.proc.pid, 0)
            return True
        except (ProcessLookupError, PermissionError):
            return False

    def _signal_group(self, sig: int) -> None:
        try:
            os.killpg(self.proc.pid, sig)  # pgid == pid: start_new_session
        except ProcessLookupError:
            pass

    def __enter__(self) -> "LocalServer":
        try:
            return self.start().wait_ready()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc) -> None:
        self.stop()
