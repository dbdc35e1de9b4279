"""What vLLM's model runners tell yarn-vllm every step, in the per-sequence modes.

Installed (idempotently) by the first request- or dynamic-mode rotary layer, in the
worker that builds it; a runner whose model has neither pays one dict lookup per step.

  request  the request's scale rows and each token's row (request_scales.RequestScaleFeeder),
           written before the forward;
  dynamic  each request's prompt length, handed to our attention metadata builders
           before they build the step (a prefill chunk runs at the scale of its whole
           prompt: scale_policy.ScalePolicy.per_sequence).

Both runners of vLLM 0.32 are hooked: V1 (every platform; the CPU runner subclasses
it) and V2 (the default on GPUs with Triton).
"""

from __future__ import annotations

import numpy as np

from yarn_vllm.vllm_seam.patching import run_after
from yarn_vllm.vllm_seam.request_scales import RequestScaleFeeder

_STATE_ATTR = "_yarn_vllm_runner_state"


class RunnerState:
    """One runner's yarn-vllm state: its request feeder and its dynamic builders, if any."""

    def __init__(self, runner) -> None:
        self.runner = runner
        layers = {id(m): m for m in runner.get_model().modules()
                  if getattr(m, "yarn_mode", None) == "request"}  # yarn_vllm.vllm_seam.rotary's layers
        self.feeder = RequestScaleFeeder(list(layers.values())) if layers else None
        self._builders: list | None = None

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

            groups = [g for gs in getattr(self.runner, "attn_groups", []) for g in gs]
            self._builders = [b for g in groups for b in g.metadata_builders
                              if isinstance(b, YarnDynamicMetadataBuilder)]
        return self._builders

    def update(self, scheduler_output) -> None:
        if self.feeder is not None:
            self.feeder.update(scheduler_output)

    def prepare(self, req_ids, num_scheduled_tokens, prompt_lens) -> None:
        """The step's batch, in its order: request ids, tokens scheduled, prompt lengths."""
        if self.feeder is not None:
            self.feeder.write(list(req_ids), np.asarray(num_scheduled_tokens[: len(req_ids)]))
        for builder in self.dynamic_builders():
            builder.prompt_lens = np.asarray(prompt_lens[: len(req_ids)]).copy()


def install() -> None:
    """Hook vLLM's model runners (see the module docstring). Safe to call repeatedly."""
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner as V1Runner

    run_after(V1Runner, "_update_states", lambda runner, _, sched, *a, **k: (
        RunnerState.of(runner).update(sched)))

    def v1_prepared(runner, _, sched, tokens, *a, **k):
        batch = runner.input_batch
        RunnerState.of(runner).prepare(batch.req_ids[: batch.num_reqs], tokens,
                                       batch.num_prompt_tokens)

    run_after(V1Runner, "_prepare_inputs", v1_prepared)
    try:
        from vllm.v1.worker.gpu.model_runner import GPUModelRunner as V2Runner
    except ImportError:  # a build without the V2 runner
        return
    run_after(V2Runner, "add_requests", lambda runner, _, sched, *a, **k: (
        RunnerState.of(runner).update(sched)))
    run_after(V2Runner, "prepare_inputs", lambda runner, batch, *a, **k: (
        RunnerState.of(runner).prepare(batch.req_ids, batch.num_scheduled_tokens,
                                       batch.prefill_len_np)))
