"""The per-sequence modes in vLLM's engine core: each request's scale key, and escalation.

engine_settings names `scheduler_class(...)` as the engine's `scheduler_cls` in request
and dynamic mode. The subclass adds three things to vLLM's scheduler and changes nothing
else:

  scale key    a request's prefix-cache blocks are hashed with its scale as an extra key
               of the first block (ScaleKeyedHasher), so blocks computed at one scale are
               never hit at another. The key is a tuple no client input can produce (a
               client's `cache_salt` enters the hash as the pair ("cache_salt", <str>)),
               and a request at s = 1 hashes exactly as plain vLLM. Request mode keys by
               the request's current scale, dynamic mode by s(P), the scale its prefill
               runs at.
  escalation   (request mode) before each step, a running request whose next forward
               would feed a position past its window (s x L < its next token's index) is
               preempted the way vLLM preempts (its KV freed, its tokens kept), moved to
               the next listed scale (ScalePolicy.escalation_factor) and rehashed; vLLM
               then recomputes it, prompt and output alike, like a fresh request at the new
               scale whose prompt is everything so far.
  scales out   (request mode) every SchedulerOutput carries {request id: scale} of the
               requests it schedules (SCALES_ATTR), which is how a scale changed here
               reaches the model runners (yarn_vllm.vllm_seam.step): the V1 runner keeps a
               resumed request's first SamplingParams, and on CPU the output is pickled to
               another process.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict, deque
from dataclasses import dataclass

from vllm.utils.hashing import get_hash_fn_by_name
from vllm.v1.core.kv_cache_utils import generate_block_hash_extra_keys, hash_block_tokens
from vllm.v1.core.sched.async_scheduler import AsyncScheduler
from vllm.v1.core.sched.scheduler import Scheduler

from yarn_vllm.yarn.scale_policy import REQUEST_FACTOR_KEY, ScalePolicy

logger = logging.getLogger("yarn_vllm")

SCALES_ATTR = "yarn_scales"  # on each SchedulerOutput in request mode: {request id: s}
_KEPT = 4096  # escalations and finished requests' scales kept for inspection
SCALE_KEY = "yarn_vllm.scale"  # (SCALE_KEY, s) is the first block's extra hash key at s != 1


@dataclass(frozen=True)
class Escalation:
    """One request moved to a larger scale: before producing its token at `num_tokens`."""

    request_id: str
    old: float
    new: float
    num_tokens: int
    recomputed: int  # tokens whose KV was dropped and must be computed again


@dataclass(frozen=True)
class Preemption:
    """One preemption by vLLM (memory) or by escalation: the request's scale and length then."""

    request_id: str
    scale: float
    num_tokens: int
    escalation: bool


class ScaleKeyedHasher:
    """vLLM's block hashing (hash_block_tokens over the same extra keys), with the scale
    added to the extra keys of the first block; later blocks chain from it.

    Text-only: the per-sequence modes serve decoder LLMs (engine_settings), whose requests
    carry no multimodal features."""

    def __init__(self, block_size: int, hash_fn, scale: float) -> None:
        self.block_size, self.hash_fn, self.scale = block_size, hash_fn, float(scale)

    def __call__(self, request) -> list:
        if request.mm_features:
            raise RuntimeError(f"yarn_vllm: request {request.request_id} has multimodal "
                               "inputs, which the per-sequence YaRN modes do not serve")
        size, tokens = self.block_size, request.all_token_ids
        start = len(request.block_hashes) * size
        parent = request.block_hashes[-1] if request.block_hashes else None
        hashes = []
        while start + size <= request.num_tokens:
            extra, _ = generate_block_hash_extra_keys(request, start, start + size, 0)
            if start == 0:
                extra = (extra or ()) + ((SCALE_KEY, self.scale),)
            parent = hash_block_tokens(self.hash_fn, parent, tokens[start:start + size], extra)
            hashes.append(parent)
            start += size
        return hashes


class _ScaleMixin:
    """What the module docstring describes, over vLLM's Scheduler or AsyncScheduler."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.yarn_policy = ScalePolicy.from_vllm_config(self.vllm_config)
        self.yarn_scale: dict[str, float] = {}  # live requests' current scales
        # what tools and tests read of an in-process engine core, bounded for a long-lived
        # server: recent escalations, and the last scale of recently finished requests
        self.yarn_escalations: deque[Escalation] = deque(maxlen=_KEPT)
        self.yarn_preemptions: deque[Preemption] = deque(maxlen=_KEPT)
        self._yarn_escalating = False
        self.yarn_finished_scales: OrderedDict[str, float] = OrderedDict()
        self._yarn_hash_fn = get_hash_fn_by_name(self.cache_config.prefix_caching_hash_algo)

    def add_request(self, request) -> None:
        if request.request_id not in self.requests:
            self._set_scale(request, self._initial_scale(request))
        super().add_request(request)

    def schedule(self, *args, **kwargs):
        if self.yarn_policy.mode == "request":
            self._escalate_outgrown()
        output = super().schedule(*args, **kwargs)
        if self.yarn_policy.mode == "request":
            setattr(output, SCALES_ATTR,
                    {r: self.yarn_scale[r] for r in output.num_scheduled_tokens})
        return output

    def _preempt_request(self, request, *args, **kwargs):
        self.yarn_preemptions.append(Preemption(
            request.request_id, self.yarn_scale.get(request.request_id, 1.0),
            request.num_tokens, self._yarn_escalating))
        return super()._preempt_request(request, *args, **kwargs)

    def _free_request(self, request, *args, **kwargs):
        s = self.yarn_scale.pop(request.request_id, None)
        if s is not None:
            self.yarn_finished_scales[request.request_id] = s
            while len(self.yarn_finished_scales) > _KEPT:
                self.yarn_finished_scales.popitem(last=False)
        return super()._free_request(request, *args, **kwargs)

    # ---- scales ---------------------------------------------------------------

    def _initial_scale(self, request) -> float:
        policy = self.yarn_policy
        if policy.mode == "dynamic":
            return policy.prefill_factor(request.num_prompt_tokens)
        extra = request.sampling_params.extra_args if request.sampling_params else None
        s = (extra or {}).get(REQUEST_FACTOR_KEY)
        if s is None:
            raise RuntimeError(
                f"yarn_vllm: request {request.request_id} reached the engine core without a "
                "YaRN scale: it did not pass yarn-vllm's admission (InputProcessor."
                "process_inputs). Request mode cannot serve it at a known scale; send requests "
                "through vLLM's LLM or OpenAI server with the plugin loaded")
        # an own yarn_factor whose window does not hold the prompt escalates at once
        return policy.escalation_factor(s, request.num_tokens) or s

    def _set_scale(self, request, s: float) -> None:
        self.yarn_scale[request.request_id] = s
        if request._block_hasher is None or s == 1.0:
            return  # no prefix caching, or s = 1 (only ever a request's first scale): vLLM's
        request._block_hasher = ScaleKeyedHasher(self.hash_block_size, self._yarn_hash_fn, s)
        request.block_hashes = []
        request.update_block_hashes()

    def _escalate_outgrown(self) -> None:
        for request in list(self.running):
            # the index of the token its next forward produces (async scheduling: after the
            # tokens still in flight)
            n = request.num_tokens + request.num_output_placeholders
            old = self.yarn_scale[request.request_id]
            new = self.yarn_policy.escalation_factor(old, n)
            if new is None:
                continue
            recomputed = request.num_computed_tokens
            self.running.remove(request)
            # in-flight output would be delivered after the same-step resume: drop it, as
            # vLLM's own forced preemption (reset_prefix_cache) does
            self._yarn_escalating = True
            try:
                self._preempt_request(request, time.monotonic(),
                                      drop_stale_output=request.num_output_placeholders > 0)
            finally:
                self._yarn_escalating = False
            self._set_scale(request, new)
            self.yarn_escalations.append(Escalation(request.request_id, old, new, n, recomputed))
            logger.info("yarn_vllm: request %s escalated from s=%g to s=%g before its token "
                        "%d; %d tokens recomputed", request.request_id, old, new, n, recomputed)


class YarnScheduler(_ScaleMixin, Scheduler):
    """vLLM's Scheduler with the per-sequence modes' scale keys and escalation."""


class YarnAsyncScheduler(_ScaleMixin, AsyncScheduler):
    """vLLM's AsyncScheduler (async scheduling, the GPU default) with the same additions."""


def scheduler_class(async_scheduling: bool) -> type:
    return YarnAsyncScheduler if async_scheduling else YarnScheduler


def escalations_of(scheduler) -> list[Escalation] | None:
    """The recent escalations of a scheduler (tools read an in-process engine core's), or
    None for another scheduler."""
    found = getattr(scheduler, "yarn_escalations", None)
    return None if found is None else list(found)


def preemptions_of(scheduler) -> list[Preemption] | None:
    """The recent preemptions (vLLM's and escalations) of a scheduler, or None for another."""
    found = getattr(scheduler, "yarn_preemptions", None)
    return None if found is None else list(found)


def finished_scale_of(scheduler, request_id: str) -> float | None:
    """The scale a recently finished request last ran at, or None (unknown, or no YaRN).
    `request_id` is the engine core's or the caller's (RequestOutput.request_id)."""
    scales = getattr(scheduler, "yarn_finished_scales", {})
    if request_id in scales:
        return scales[request_id]
    return next((s for r, s in reversed(scales.items()) if external_request_id(r) == request_id),
                None)


def external_request_id(internal: str) -> str:
    """The caller's request id of an engine-core request id: vLLM's InputProcessor makes the
    latter `<caller's id>-<8 random hex digits>` (vllm_names.RUNTIME_ATTRIBUTES)."""
    head, _, tail = internal.rpartition("-")
    return head if head and len(tail) == 8 else internal
