"""The checks' shared report: one line per check on stdout, and the list for the JSON."""

from __future__ import annotations

import traceback

RESULTS: list[dict] = []


def check(name: str, ok: bool, detail: str = "") -> bool:
    RESULTS.append({"check": name, "ok": bool(ok), "detail": detail})
    print(f"{'PASS' if ok else 'FAIL'}  {name}{': ' + detail if detail else ''}", flush=True)
    return bool(ok)


def guarded(name: str, fn, *args) -> None:
    """Run one group of checks; an exception fails the group, naming it."""
    try:
        fn(*args)
    except Exception as e:  # noqa: BLE001 - the report must name every failure
        traceback.print_exc()
        check(name, False, f"raised {type(e).__name__}: {e}")
