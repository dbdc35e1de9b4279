"""One vLLM engine stepped by hand: requests added at the step they arrive, every step reported.

`LLM.generate` submits a batch and returns when all of it is done. Three things need the
steps in between: `yarn-vllm generate`'s progress line (prompt tokens in the KV cache after
each prefill chunk, yarn_vllm.tools.progress), the engine benchmark (each request's token
count after each step, timed, yarn_vllm.tools.bench.engine), and tests that make requests
arrive while others decode and check what vLLM's scheduler decided (tests/stepped_engine_worker.py).
`run_stepped` is that one loop.

With the engine core in this process (VLLM_ENABLE_V1_MULTIPROCESSING=0) the scheduler is
watched: its real `schedule` runs and its output goes on untouched, and each Step records
how many tokens of each request it scheduled and which requests it preempted. With the core
in its own process those fields are None.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Arrival:
    """A request for `run_stepped`: added to the engine just before step `step` (0: first)."""

    request_id: str  # unique within the run; outputs are keyed by it
    prompt: object  # a vLLM prompt: TokensPrompt, text, ...
    params: object  # SamplingParams
    step: int = 0


@dataclass
class Step:
    """What one engine step did."""

    index: int
    t_end: float  # time.perf_counter() when the step returned
    outputs: list  # the RequestOutputs it returned (request_id: the Arrival's id)
    # {request id: tokens scheduled} and the ids preempted, as vLLM's scheduler decided;
    # None when the scheduler runs in another process. Ids are the Arrivals' own.
    scheduled: dict[str, int] | None = None
    preempted: list[str] | None = None
    # {request id: its tokens already in the KV cache when the step was scheduled}: the step
    # computed positions [computed, computed + scheduled) of each request
    computed: dict[str, int] | None = None
    # {request id: vLLM's Request} of the requests still in the scheduler after the step
    # (num_computed_tokens, num_output_tokens, sampling_params as the engine holds them)
    requests: dict[str, object] | None = field(default=None, repr=False)


# vLLM's internals are read in the seam (yarn_vllm.vllm_seam.vllm_names lists them)
from yarn_vllm.vllm_seam.introspect import engine_scheduler as in_process_scheduler  # noqa: E402
from yarn_vllm.vllm_seam.introspect import render_prompts as render  # noqa: E402


def run_stepped(llm, arrivals: list[Arrival], on_step=None, *, rendered: bool = False
                ) -> dict[str, object]:
    """Step `llm`'s engine until every request is finished; returns {request id: its final
    RequestOutput}. `on_step(Step)` is called after every step.

    Prompts are rendered as LLM.generate renders them (rendered=True: they already are). Each request's SamplingParams are used
    as given (output_kind included: CUMULATIVE, SamplingParams' default, reports every step's
    token counts; FINAL_ONLY, LLM.generate's, only the finished).
    """
    engine = llm.llm_engine
    pending = sorted(arrivals, key=lambda a: a.step)
    ids = [a.request_id for a in pending]
    if len(set(ids)) != len(ids):
        raise ValueError(f"request ids repeat: {ids}")
    prompts = [a.prompt for a in pending]
    queue = list(zip(pending, prompts if rendered else render(llm, prompts)))
    scheduler = in_process_scheduler(llm)
    ours: dict[str, str] = {}  # engine request id (ours plus vLLM's suffix) -> ours
    decided: list = []
    restore = _watch(scheduler, decided) if scheduler is not None else None
    finished: dict[str, object] = {}
    index = 0
    try:
        while queue or engine.has_unfinished_requests():
            while queue and queue[0][0].step <= index:
                arrival, prompt = queue.pop(0)
                ours[engine.add_request(arrival.request_id, prompt, arrival.params)] = \
                    arrival.request_id
            decided.clear()
            outputs = engine.step()
            t_end = time.perf_counter()
            for out in outputs:
                if out.finished:
                    finished[out.request_id] = out
            scheduled = preempted = requests = computed = None
            if scheduler is not None:  # one schedule() a step here; summed should there be more
                scheduled, preempted, computed = {}, [], {}
                for out in decided:
                    for new in out.scheduled_new_reqs:
                        computed.setdefault(ours.get(new.req_id, new.req_id),
                                            new.num_computed_tokens)
                    cached = out.scheduled_cached_reqs
                    for r, n in zip(cached.req_ids, cached.num_computed_tokens):
                        computed.setdefault(ours.get(r, r), n)
                    for r, n in out.num_scheduled_tokens.items():
                        scheduled[ours.get(r, r)] = scheduled.get(ours.get(r, r), 0) + n
                    preempted += [ours.get(r, r) for r in out.preempted_req_ids or ()]
                preempted.sort()
                requests = {ours.get(r, r): req for r, req in scheduler.requests.items()}
            if on_step is not None:
                on_step(Step(index, t_end, outputs, scheduled, preempted, computed, requests))
            index += 1
    finally:
        if restore is not None:
            restore()
    return finished


def _watch(scheduler, decided: list):
    """Record every SchedulerOutput `scheduler.schedule` returns; returns the undo."""
    schedule = scheduler.schedule

    def recorded(*args, **kwargs):
        out = schedule(*args, **kwargs)
        decided.append(out)
        return out

    scheduler.schedule = recorded
    return lambda: scheduler.__dict__.pop("schedule", None)
