"""Progress of an offline vLLM batch: prompt tokens processed out of the total, rate and ETA.

vLLM's own bar counts finished prompts, so through one long CPU prefill it sits at 0% for
minutes. `run_stepped` steps the engine by hand, one scheduler step at a time
(yarn_vllm.tools.stepped, the loop `bench` and the tests use too), and after each step
counts the prompt tokens already in the KV cache. With chunked
prefill that is one update per chunk (vLLM's CPU default is 4,096 tokens a step).

The counts come from the scheduler's requests (`num_computed_tokens`), which this process
can read only when the engine core runs in it (VLLM_ENABLE_V1_MULTIPROCESSING=0, as
`generate` runs it). With the engine core in its own process, only finished requests are
counted, and vLLM's "No available shared memory broadcast block found in 60 seconds"
lines appear whenever one step runs past a minute; `ProgressLine` says so once.
"""

from __future__ import annotations

import shutil
import sys
import threading
import time
from dataclasses import dataclass

from yarn_vllm.tools.stepped import Arrival, Step, in_process_scheduler, render  # noqa: F401
from yarn_vllm.tools.stepped import run_stepped as run_stepped_engine


@dataclass(frozen=True)
class Progress:
    """A batch after one engine step."""

    elapsed: float  # seconds since the batch was submitted
    prompt_done: int  # prompt tokens in the KV cache (every prompt token of a finished request)
    prompt_total: int
    generated: int  # tokens generated so far, all requests
    finished: int  # requests finished
    requests: int
    rate: float | None  # prompt tokens per second of prefill so far; None before the first
    eta: float | None  # seconds until the last prompt token is in the cache; None: unknown

    @property
    def prefilling(self) -> bool:
        return self.prompt_done < self.prompt_total


def span_positions(start: int, stop: int) -> int:
    """Sum of the positions start .. stop-1 (the attention work of computing those tokens)."""
    return (start + stop - 1) * (stop - start) // 2 if stop > start else 0


class PrefillCost:
    """The seconds of a prefill step, fitted over the steps so far as t = a n + b w.

    n is the number of prompt tokens a step computed and w the sum of their positions: a
    token's linear layers cost the same everywhere, its attention grows with the keys
    before it. A rate alone (b = 0) would promise the last chunks of a long prompt as
    fast as the first ones. With one step, or a fit that comes out negative, it is a rate.
    """

    def __init__(self) -> None:
        self.rows: list[tuple[float, float, float]] = []  # (n, w, seconds)

    def add(self, seconds: float, spans: list[tuple[int, int]]) -> None:
        """One step that computed prompt positions [start, stop) of each request in `spans`."""
        n = sum(stop - start for start, stop in spans)
        if n > 0:
            self.rows.append((n, sum(span_positions(a, b) for a, b in spans), seconds))

    def coefficients(self) -> tuple[float, float] | None:
        """(a, b) in seconds per token and per position; None before the first step."""
        if not self.rows:
            return None
        snn = sum(n * n for n, _, _ in self.rows)
        snw = sum(n * w for n, w, _ in self.rows)
        sww = sum(w * w for _, w, _ in self.rows)
        snt = sum(n * t for n, _, t in self.rows)
        swt = sum(w * t for _, w, t in self.rows)
        det = snn * sww - snw * snw
        if len(self.rows) >= 2 and det > 1e-9 * snn * sww:
            a, b = (snt * sww - swt * snw) / det, (swt * snn - snt * snw) / det
            if a >= 0 and b >= 0:
                return a, b
        return sum(t for *_, t in self.rows) / sum(n for n, _, _ in self.rows), 0.0

    def rate(self) -> float | None:
        """Prompt tokens per second over the prefill steps so far."""
        seconds = sum(t for *_, t in self.rows)
        return sum(n for n, _, _ in self.rows) / seconds if seconds > 0 else None

    def predict(self, spans: list[tuple[int, int]]) -> float | None:
        """Seconds to compute the prompt positions still left, [start, stop) per request."""
        ab = self.coefficients()
        if ab is None:
            return None
        n = sum(stop - start for start, stop in spans)
        return ab[0] * n + ab[1] * sum(span_positions(a, b) for a, b in spans)


def run_stepped(llm, prompts: list, params: list, on_progress=None) -> list:
    """What `llm.generate(prompts, params)` returns (outputs in input order), with the engine
    stepped by hand (yarn_vllm.tools.stepped) and `on_progress(Progress)` called after every
    step."""
    from vllm.sampling_params import RequestOutputKind

    inputs = render(llm, prompts)
    arrivals = []
    for i, (inp, p) in enumerate(zip(inputs, params)):
        p.output_kind = RequestOutputKind.FINAL_ONLY  # as LLM.generate: counts come from below
        arrivals.append(Arrival(f"gen-{i}", inp, p))
    lengths = {a.request_id: len(inp["prompt_token_ids"]) for a, inp in zip(arrivals, inputs)}
    total, cost, finished = sum(lengths.values()), PrefillCost(), {}
    computed = {rid: 0 for rid in lengths}  # prompt tokens in the cache, per request
    t0 = t_step = time.perf_counter()

    def step(s: Step) -> None:
        nonlocal t_step
        finished.update((o.request_id, o) for o in s.outputs if o.finished)
        live = s.requests or {}
        generated = sum(len(o.outputs[0].token_ids) for o in finished.values())
        spans = []
        for rid, n in lengths.items():
            r = live.get(rid)
            if r is not None:
                done = min(r.num_computed_tokens, n)  # drops back if the request is preempted
                generated += r.num_output_tokens
            else:  # finished, or not yet visible (engine core in another process)
                done = n if rid in finished else computed[rid]
            if done > computed[rid]:
                spans.append((computed[rid], done))
            computed[rid] = done
        cost.add(s.t_end - t_step, spans)
        t_step = s.t_end
        if on_progress is not None:
            rate = eta = None  # whole prompts at a time (no scheduler here) say too little
            if s.requests is not None:
                rate = cost.rate()
                eta = cost.predict([(computed[r], n) for r, n in lengths.items()])
            on_progress(Progress(s.t_end - t0, sum(computed.values()), total, generated,
                                 len(finished), len(lengths), rate, eta))

    outputs = run_stepped_engine(llm, arrivals, step, rendered=True)
    return [outputs[a.request_id] for a in arrivals]


def clock(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    return f"{seconds // 60}:{seconds % 60:02d}"


SHM_NOTE = ("note: vLLM's engine runs in its own process here; its lines \"No available shared "
            "memory broadcast block found in 60 seconds\" during a long CPU prefill are "
            "expected: the engine is busy with one long step, not hung.")


class ProgressLine:
    """Draws Progress on `stream`: one line redrawn in place on a terminal (and every second
    between steps, so elapsed time and ETA move while one chunk computes), else a line per
    prefill step and one when done."""

    def __init__(self, stream=None, *, note_shm: bool = False, tick_s: float = 1.0) -> None:
        self.stream = stream or sys.stderr
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.last: Progress | None = None
        self.t_last = time.perf_counter()
        self.lock = threading.Lock()
        self.stop = threading.Event()
        if note_shm:
            print(SHM_NOTE, file=self.stream, flush=True)
        if self.tty:
            threading.Thread(target=self._tick, args=(tick_s,), daemon=True).start()

    def __call__(self, p: Progress) -> None:
        with self.lock:
            changed = self.last is None or p.prompt_done != self.last.prompt_done
            self.last, self.t_last = p, time.perf_counter()
            if self.tty:
                self._draw(0.0)
            elif changed or p.finished == p.requests:
                print(self.render(p), file=self.stream, flush=True)

    def close(self) -> None:
        self.stop.set()
        with self.lock:
            if self.tty and self.last is not None:
                self._draw(0.0)
                self.stream.write("\n")
                self.stream.flush()

    def _tick(self, every: float) -> None:
        while not self.stop.wait(every):
            with self.lock:
                if self.last is not None:
                    self._draw(time.perf_counter() - self.t_last)

    def _draw(self, since: float) -> None:
        # cut to the terminal's width: a wrapped line cannot be redrawn in place
        width = shutil.get_terminal_size().columns - 1
        self.stream.write("\r" + self.render(self.last, since)[:width] + "\033[K")
        self.stream.flush()

    @staticmethod
    def render(p: Progress, since: float = 0.0) -> str:
        """The line for `p`, `since` seconds after it was reported (what matters first: an
        80-column terminal shows up to the ETA)."""
        rate = f", {p.rate:,.0f} tok/s" if p.rate else ""
        tail = (f"elapsed {clock(p.elapsed + since)} | {p.generated:,} generated, "
                f"{p.finished}/{p.requests} done")
        if not p.prefilling:
            return f"prefill done: {p.prompt_total:,} prompt tokens{rate}, {tail}"
        width = 12
        filled = width * p.prompt_done // max(1, p.prompt_total)
        eta = f", ETA {clock(max(0.0, p.eta - since))}" if p.eta is not None else ""
        return (f"prefill {p.prompt_done:,}/{p.prompt_total:,} tokens "
                f"{100 * p.prompt_done // max(1, p.prompt_total)}% "
                f"[{'#' * filled}{'.' * (width - filled)}]{rate}{eta}, {tail}")
