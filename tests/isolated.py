"""Probes that may kill the process they run in (a signal, not an exception), run in a
child process: a crash then fails the one test that ran them, naming the probe,
instead of taking pytest down with it."""

from __future__ import annotations

import json
import os
import subprocess
import sys

TESTS = os.path.dirname(os.path.abspath(__file__))


def run_probes(module: str, function: str, names: list[str], *args, timeout: float = 90) -> dict:
    """{name: module.function(name, *args)} computed in a fresh Python; each result must be
    JSON. Fails (AssertionError) naming the probe that was running if the child dies or
    outlives `timeout` seconds."""
    code = (f"import json, sys; sys.path.insert(0, {TESTS!r}); import {module} as m\n"
            f"for name in {names!r}:\n"
            "    print('probe', name, flush=True)\n"
            f"    print('result', json.dumps(m.{function}(name, *{args!r})), flush=True)\n")
    try:
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                              timeout=timeout, cwd=os.path.dirname(TESTS))
        stdout, stderr, died = proc.stdout, proc.stderr, proc.returncode
    except subprocess.TimeoutExpired as e:
        decode = lambda b: b.decode() if isinstance(b, bytes) else (b or "")  # noqa: E731
        stdout, stderr, died = decode(e.stdout), decode(e.stderr), f"timeout after {timeout} s"
    results, running = {}, None
    for line in stdout.splitlines():
        kind, _, rest = line.partition(" ")
        if kind == "probe":
            running = rest
        elif kind == "result":
            results[running] = json.loads(rest)
    assert died == 0, (f"the child process ended ({died}; a negative code is a signal) while "
                       f"running probe {running!r}:\n{stderr[-3000:]}")
    return results


def refusal(call) -> str:
    """The first line of the RuntimeError `call()` raises, or "accepted": what a probe
    records of one implementation's answer to a bad argument."""
    try:
        call()
    except RuntimeError as e:
        return str(e).splitlines()[0]
    return "accepted"
