"""Request mode in the engine: one YaRN scale per request, chosen at admission, kept for life.

Two halves, in the two processes that vLLM runs:

* **Admission** (the frontend's InputProcessor, `admit`): the request's scale s
  comes from ScalePolicy.request_factor (prompt and max_tokens, or the request's own
  `yarn_factor`, validated here so that a bad value is the client's 400, not an
  engine fault). s is written back into the request's own SamplingParams.extra_args
  and, for s != 1, into its `cache_salt`, so its KV blocks hash apart from those of
  other scales (vLLM chains block hashes from the first block, which carries the
  salt); requests at one scale share prefixes as before, and s = 1 hashes exactly
  as plain vLLM.
* **Feeding** (each model runner, `RequestScaleFeeder`): before every forward, each
  scheduled token's row of the rotary layers' frequency table is written into
  their persistent `scale_index` buffer. The rotary forward then only indexes
  device memory: no host sync, the same buffers every step (CUDA-graph safe).

The scale travels with the request's SamplingParams, which survive preemption and
recompute, so a preempted request resumes at the scale it was admitted at.
"""

from __future__ import annotations

import numpy as np
import torch

from yarn_vllm.errors import UserError
from yarn_vllm.patching import run_after
from yarn_vllm.scale_policy import REQUEST_FACTOR_KEY, ScalePolicy

_POLICY_ATTR = "_yarn_vllm_request_policy"
_FEEDER_ATTR = "_yarn_vllm_request_feeder"


def salted(cache_salt: str | None, factor: float) -> str | None:
    """The cache_salt of a request at scale `factor`: the user's salt, plus the scale if != 1."""
    if factor == 1.0:
        return cache_salt
    return f"{cache_salt}|yarn_factor={factor!r}" if cache_salt else f"yarn_factor={factor!r}"


def admit(processor, request, resumable: bool = False) -> None:
    """Fix the scale of `request` (an EngineCoreRequest) at admission; a no-op outside request mode.

    Raises UserError (a ValueError: vLLM's server answers 400) for a bad `yarn_factor`.
    """
    policy = processor.__dict__.get(_POLICY_ATTR, processor)
    if policy is processor:  # first request: read the model's policy once
        policy = ScalePolicy.from_vllm_config(processor.vllm_config)
        policy = policy if policy is not None and policy.mode == "request" else None
        setattr(processor, _POLICY_ATTR, policy)
    params = request.sampling_params
    if policy is None or params is None:
        return
    if resumable:
        raise UserError("resumable", "is set in request mode; a prompt streamed in later "
                        "could outgrow the scale fixed at admission",
                        "send the whole prompt at once, or serve with yarn_mode 'dynamic'",
                        source="request")
    extra = dict(params.extra_args or {})
    s = policy.request_factor(_prompt_len(request), params.max_tokens or 0,
                              extra.get(REQUEST_FACTOR_KEY))
    extra[REQUEST_FACTOR_KEY] = s
    params.extra_args = extra
    request.cache_salt = salted(request.cache_salt, s)


def _prompt_len(request) -> int:
    if request.prompt_token_ids is not None:
        return len(request.prompt_token_ids)
    return int(request.prompt_embeds.shape[0])


class RequestScaleFeeder:
    """A model runner's request-mode state: each live request's scale, and which row of the
    rotary layers' frequency tables serves each scale.

    The listed scales own rows 0..n-1 for good; a request's own `yarn_factor` takes one of
    the spare rows (the layers size them to max_num_seqs, so a batch always fits),
    reusing the least recently used one not needed by the batch at hand.
    """

    def __init__(self, layers: list) -> None:
        self.layers = layers
        self.policy: ScalePolicy = layers[0].policy
        listed = self.policy.scales_on_offer()
        self.row_of: dict[float, int] = {s: i for i, s in enumerate(listed)}
        self.spare = list(range(len(listed), layers[0].inv_freq.shape[0]))  # LRU first
        self.factor_of: dict[str, float] = {}

    @classmethod
    def of(cls, runner) -> "RequestScaleFeeder | None":
        """The runner's feeder, made on first use; None when its model has no request-mode layer."""
        feeder = runner.__dict__.get(_FEEDER_ATTR, runner)
        if feeder is runner:  # yarn_vllm.rotary's layers in request mode
            layers = {id(m): m for m in runner.get_model().modules()
                      if getattr(m, "yarn_mode", None) == "request"}
            feeder = cls(list(layers.values())) if layers else None
            setattr(runner, _FEEDER_ATTR, feeder)
        return feeder

    def update(self, scheduler_output) -> None:
        """Record the scale of every newly scheduled request; forget finished ones."""
        for new in scheduler_output.scheduled_new_reqs:
            params = new.sampling_params
            if params is None:
                continue
            s = (params.extra_args or {}).get(REQUEST_FACTOR_KEY)
            if s is None:  # admitted without our frontend hook: the same rule, here
                n = len(new.prompt_token_ids) if new.prompt_token_ids is not None else int(
                    new.prompt_embeds.shape[0])
                s = self.policy.request_factor(n, params.max_tokens or 0)
            self.factor_of[new.req_id] = float(s)
        for req_id in scheduler_output.finished_req_ids:
            self.factor_of.pop(req_id, None)

    def write(self, req_ids, num_scheduled_tokens: np.ndarray) -> None:
        """Fill scale_index for a batch: request i's row, num_scheduled_tokens[i] times."""
        factors = [self.factor_of[r] for r in req_ids]
        needed = set(factors)
        rows = np.array([self._row(s, needed) for s in factors], dtype=np.int32)
        index = torch.from_numpy(np.repeat(rows, num_scheduled_tokens))
        for layer in self.layers:
            layer.scale_index[: index.shape[0]].copy_(index, non_blocking=True)

    def _row(self, s: float, needed: set[float]) -> int:
        row = self.row_of.get(s)
        if row is not None:
            if row in self.spare:  # most recently used last
                self.spare.remove(row)
                self.spare.append(row)
            return row
        row = next(r for r in self.spare if self._scale_at(r) not in needed)
        old = self._scale_at(row)
        if old is not None:
            del self.row_of[old]
        self.row_of[s] = row
        self.spare.remove(row)
        self.spare.append(row)
        inv_freq, mscale = self.policy.inv_freq(s), self.policy.mscale(s)
        for layer in self.layers:  # stream-ordered after any forward still reading the row
            layer.inv_freq[row].copy_(inv_freq, non_blocking=True)
            layer.mscales[row] = mscale
        return row

    def _scale_at(self, row: int) -> float | None:
        return next((s for s, r in self.row_of.items() if r == row), None)


def install_runner_hooks() -> None:
    """Make vLLM's model runners (V1 on every platform, V2 on GPUs) feed request-mode layers.

    Idempotent; installed by the first request-mode rotary layer, in the worker that builds it.
    """
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner as V1Runner

    run_after(V1Runner, "_update_states", lambda runner, _, sched, *a, **k: (
        _feeder_update(runner, sched)))
    run_after(V1Runner, "_prepare_inputs", lambda runner, _, sched, tokens, *a, **k: (
        _feeder_write(runner, runner.input_batch.req_ids[: runner.input_batch.num_reqs],
                      tokens)))
    try:
        from vllm.v1.worker.gpu.model_runner import GPUModelRunner as V2Runner
    except ImportError:  # a build without the V2 runner
        return
    run_after(V2Runner, "add_requests", lambda runner, _, sched, *a, **k: (
        _feeder_update(runner, sched)))
    run_after(V2Runner, "prepare_inputs", lambda runner, batch, *a, **k: (
        _feeder_write(runner, batch.req_ids, batch.num_scheduled_tokens)))


def _feeder_update(runner, scheduler_output) -> None:
    feeder = RequestScaleFeeder.of(runner)
    if feeder is not None:
        feeder.update(scheduler_output)


def _feeder_write(runner, req_ids, num_scheduled_tokens) -> None:
    feeder = RequestScaleFeeder.of(runner)
    if feeder is not None:
        feeder.write(list(req_ids), np.asarray(num_scheduled_tokens[: len(req_ids)]))
