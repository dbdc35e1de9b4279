"""The one description of a model-runner step that yarn-vllm consumes, from either runner.

vLLM 0.32 has two model runners: V1 (every platform; the CPU runner subclasses it) and V2
(the default on GPUs with Triton). Each is hooked once, by register() (vllm_names lists
the methods and attributes), to produce one `StepBatch` per step, which is all that the
per-sequence modes read:

  request  RequestScaleFeeder writes each scheduled token's rotary row from the step's
           scales, which our scheduler put into the SchedulerOutput (vllm_seam.scheduler);
  dynamic  our attention metadata builders take the step's prompt lengths (a prefill
           chunk runs at the scale of its whole prompt: ScalePolicy.per_sequence).

A runner whose model has neither mode pays one dict lookup per step.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from yarn_vllm.vllm_seam.patching import run_after
from yarn_vllm.vllm_seam.request_scales import RequestScaleFeeder
from yarn_vllm.vllm_seam.scheduler import SCALES_ATTR

_STATE_ATTR = "_yarn_vllm_runner_state"


@dataclass(frozen=True)
class StepBatch:
    """One step's requests in the runner's batch order (B requests)."""

    req_ids: list[str]
    num_scheduled_tokens: np.ndarray  # [B] int: tokens each request runs this step
    prompt_lens: np.ndarray  # [B] int: each request's prompt length P
    scales: dict[str, float] | None  # request mode: {request id: s}, from our scheduler


class RunnerState:
    """One runner's yarn-vllm state: its request feeder and its dynamic builders, if any."""

    def __init__(self, runner) -> None:
        self.runner = runner
        layers = {id(m): m for m in runner.get_model().modules()
                  if getattr(m, "yarn_mode", None) == "request"}  # vllm_seam.rotary's layers
        self.feeder = RequestScaleFeeder(list(layers.values())) if layers else None
        self._builders: list | None = None
        self._scales: dict[str, float] | None = None

    @classmethod
    def of(cls, runner) -> "RunnerState":
        state = runner.__dict__.get(_STATE_ATTR)
        if state is None:
            state = cls(runner)
            setattr(runner, _STATE_ATTR, state)
        return state

    def dynamic_builders(self) -> list:
        """Our metadata builders among the runner's attention groups (made with the KV cache)."""
        if self._builders is None:
            from yarn_vllm.attention.backend import YarnDynamicMetadataBuilder

            groups = [g for gs in self.runner.attn_groups for g in gs]
            self._builders = [b for g in groups for b in g.metadata_builders
                              if isinstance(b, YarnDynamicMetadataBuilder)]
        return self._builders

    def scheduled(self, scheduler_output) -> None:
        """The step's SchedulerOutput, before the runner builds its batch."""
        if self.feeder is not None:
            self._scales = getattr(scheduler_output, SCALES_ATTR, None)
            if self._scales is None and scheduler_output.num_scheduled_tokens:
                raise RuntimeError(
                    "yarn_vllm: request mode's model runner got a step without request scales: "
                    "the engine core is not running yarn-vllm's scheduler (scheduler_cls)")

    def prepare(self, req_ids, num_scheduled_tokens, prompt_lens) -> None:
        """The step's batch, in its order: request ids, tokens scheduled, prompt lengths."""
        n = len(req_ids)
        step = StepBatch(list(req_ids), np.asarray(num_scheduled_tokens[:n]),
                         np.asarray(prompt_lens[:n]).copy(), self._scales)
        if self.feeder is not None:
            self.feeder.write(step)
        for builder in self.dynamic_builders():
            builder.step = step


def install() -> None:
    """Hook vLLM's model runners (see the module docstring). Safe to call repeatedly."""
    from vllm.v1.worker.gpu.model_runner import GPUModelRunner as V2Runner
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner as V1Runner

    run_after(V1Runner, "_update_states", lambda runner, _, sched, *a, **k: (
        RunnerState.of(runner).scheduled(sched)))

    def v1_prepared(runner, _, sched, tokens, *a, **k):
        batch = runner.input_batch
        RunnerState.of(runner).prepare(batch.req_ids[: batch.num_reqs], tokens,
                                       batch.num_prompt_tokens)

    run_after(V1Runner, "_prepare_inputs", v1_prepared)
    run_after(V2Runner, "add_requests", lambda runner, _, sched, *a, **k: (
        RunnerState.of(runner).scheduled(sched)))
    run_after(V2Runner, "prepare_inputs", lambda runner, batch, *a, **k: (
        RunnerState.of(runner).prepare(batch.req_ids, batch.num_scheduled_tokens,
                                       batch.prefill_len_np)))
