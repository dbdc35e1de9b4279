"""Admission: a request's YaRN scale, fixed in the frontend as it enters the engine.

vLLM's InputProcessor builds every EngineCoreRequest (offline LLM and the OpenAI server
alike); the plugin runs `admit` after it on each (yarn_vllm.vllm_seam.plugin).

  request  s from ScalePolicy.admission_factor: the positions the request will feed
           (prompt + max_tokens - 1), or prompt + reserve for an open-ended request (the
           caller set no max_tokens), or the request's own `yarn_factor`, validated here
           so that a bad value is the client's 400, not an engine fault. s is written into
           the request's own SamplingParams.extra_args, which the engine core's scheduler
           (yarn_vllm.vllm_seam.scheduler) reads, escalates and keys the prefix cache with.
  dynamic  nothing to fix here: the scheduler keys blocks with s(P) itself.

The scale never goes into `cache_salt`: that string is the client's, and anything derived
from it by concatenation a client could forge (yarn_vllm.vllm_seam.scheduler.ScaleKeyedHasher).
"""

from __future__ import annotations

from vllm.exceptions import VLLMValidationError

from yarn_vllm.errors import UserError
from yarn_vllm.yarn.scale_policy import REQUEST_FACTOR_KEY, ScalePolicy

_POLICY_ATTR = "_yarn_vllm_policy"
# Set on a SamplingParams whose max_tokens the server filled in because the client sent
# none (yarn_vllm.vllm_seam.openai_hooks). An attribute, not an extra_args key: a client
# can put any key into extra_args (vllm_xargs), but cannot set an attribute.
OPEN_ENDED_ATTR = "_yarn_vllm_open_ended"


class RequestError(UserError, VLLMValidationError):
    """A request's own value is wrong: one line naming the field and the fix, answered 400.

    vLLM maps only its own VLLMValidationError to a client error; any other exception raised
    while a request enters the engine becomes a 500 with an empty message, which OpenAI
    clients then send twice more."""

    def __init__(self, field: str, problem: str, fix: str):
        UserError.__init__(self, field, problem, fix, source="request")
        self.parameter, self.value = field, None

    def __str__(self) -> str:
        return self.args[0]

    def __reduce__(self):
        return RequestError, (self.field, self.problem, self.fix)


def admit(processor, request, params_in, resumable: bool = False) -> None:
    """Fix the scale of `request` (an EngineCoreRequest) as it enters the engine.

    `params_in` is the caller's SamplingParams before vLLM filled in max_tokens (offline,
    max_tokens None means open-ended; the server marks its open-ended chat requests with
    OPEN_ENDED_ATTR). A no-op without YaRN. Raises RequestError (HTTP 400) for a bad
    `yarn_factor` and, in every YaRN mode, for a prompt token id outside the vocabulary:
    vLLM checks ids only when it has a tokenizer, and without one (--skip-tokenizer-init)
    such an id killed the engine core for every client.
    """
    policy = processor.__dict__.get(_POLICY_ATTR, processor)
    if policy is processor:  # first request: read the model's policy once
        policy = ScalePolicy.from_vllm_config(processor.vllm_config)
        setattr(processor, _POLICY_ATTR, policy)
    if policy is None:
        return
    _check_token_ids(request, processor.vllm_config.model_config.get_vocab_size())
    if policy.mode == "static":
        return
    if resumable:
        raise RequestError("resumable", f"is set in yarn_mode {policy.mode!r}; a prompt streamed "
                     "in later would outgrow the scale fixed at admission",
                     "send the whole prompt at once, or serve with yarn_mode 'static'")
    params = request.sampling_params
    if policy.mode != "request" or params is None:
        return
    extra = dict(params.extra_args or {})
    open_ended = params_in is None or getattr(params_in, "max_tokens", None) is None or bool(
        getattr(params_in, OPEN_ENDED_ATTR, False))
    try:
        s = policy.admission_factor(_prompt_len(request), None if open_ended else
                                    params.max_tokens, extra.get(REQUEST_FACTOR_KEY))
    except UserError as e:
        raise RequestError(e.field, e.problem, e.fix) from None
    extra[REQUEST_FACTOR_KEY] = s
    params.extra_args = extra


def _check_token_ids(request, vocab_size: int) -> None:
    ids = request.prompt_token_ids
    if ids and not 0 <= min(ids) <= max(ids) < vocab_size:
        bad = next(t for t in ids if not 0 <= t < vocab_size)
        raise RequestError("prompt", f"holds token id {bad}, outside the model's vocabulary "
                     f"(0 to {vocab_size - 1})", "send token ids the model knows")


def _prompt_len(request) -> int:
    if request.prompt_token_ids is not None:
        return len(request.prompt_token_ids)
    return int(request.prompt_embeds.shape[0])
