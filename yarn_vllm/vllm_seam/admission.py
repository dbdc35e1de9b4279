"""Admission: the YaRN scale of a request, fixed in the frontend as it enters the engine.

vLLM's InputProcessor builds every EngineCoreRequest (offline LLM and the OpenAI
server alike); the plugin runs `admit` on each (yarn_vllm.vllm_seam.plugin). In the
per-sequence modes a cached KV block is only valid for requests whose prefill ran at
the same scale, so that scale goes into the request's `cache_salt` when it is not 1:
vLLM chains block hashes from the first block, which carries the salt, so the
request's blocks hash apart from other scales' while requests at one scale share
prefixes as before, and s = 1 hashes exactly as plain vLLM (the user's own salt is
kept in front).

  request  s from ScalePolicy.request_factor (prompt and max_tokens, or the request's
           own `yarn_factor`, validated here so that a bad value is the client's 400,
           not an engine fault), written back into the request's own
           SamplingParams.extra_args for the model runner (yarn_vllm.vllm_seam.request_scales);
  dynamic  s(P), the scale every chunk of its prefill runs at.
"""

from __future__ import annotations

from yarn_vllm.errors import UserError
from yarn_vllm.yarn.scale_policy import REQUEST_FACTOR_KEY, ScalePolicy

_POLICY_ATTR = "_yarn_vllm_policy"


def salted(cache_salt: str | None, factor: float) -> str | None:
    """The cache_salt of a request at scale `factor`: the user's salt, plus the scale if != 1."""
    if factor == 1.0:
        return cache_salt
    return f"{cache_salt}|yarn_factor={factor!r}" if cache_salt else f"yarn_factor={factor!r}"


def admit(processor, request, resumable: bool = False) -> None:
    """Fix the scale of `request` (an EngineCoreRequest) as it enters the engine.

    A no-op without YaRN. Raises UserError (a ValueError: vLLM's server answers 400) for a
    bad `yarn_factor`, and, in every YaRN mode, for a prompt token id outside the
    vocabulary: vLLM checks ids only when it has a tokenizer, and without one
    (--skip-tokenizer-init) such an id killed the engine core for every client.
    """
    policy = processor.__dict__.get(_POLICY_ATTR, processor)
    if policy is processor:  # first request: read the model's policy once
        policy = ScalePolicy.from_vllm_config(processor.vllm_config)
        setattr(processor, _POLICY_ATTR, policy)
    params = request.sampling_params
    if policy is None or params is None:
        return
    _check_token_ids(request, processor.vllm_config.model_config.get_vocab_size())
    if policy.mode == "static":
        return
    if resumable:
        raise UserError("resumable", f"is set in yarn_mode {policy.mode!r}; a prompt streamed "
                        "in later would outgrow the scale fixed at admission",
                        "send the whole prompt at once, or serve with yarn_mode 'static'",
                        source="request")
    if policy.mode == "dynamic":  # its blocks' keys at layers >= 1 depend on s(P)
        s = policy.prefill_factor(_prompt_len(request))
        request.cache_salt = salted(request.cache_salt, s)
        return
    extra = dict(params.extra_args or {})
    s = policy.request_factor(_prompt_len(request), params.max_tokens or 0,
                              extra.get(REQUEST_FACTOR_KEY))
    extra[REQUEST_FACTOR_KEY] = s
    params.extra_args = extra
    request.cache_salt = salted(request.cache_salt, s)


def _check_token_ids(request, vocab_size: int) -> None:
    ids = request.prompt_token_ids
    if ids and not 0 <= min(ids) <= max(ids) < vocab_size:
        bad = next(t for t in ids if not 0 <= t < vocab_size)
        raise UserError("prompt", f"holds token id {bad}, outside the model's vocabulary "
                        f"(0 to {vocab_size - 1})", "send token ids the model knows",
                        source="request")


def _prompt_len(request) -> int:
    if request.prompt_token_ids is not None:
        return len(request.prompt_token_ids)
    return int(request.prompt_embeds.shape[0])
