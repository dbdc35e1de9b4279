"""What request mode needs from vLLM's OpenAI server, which only the server can tell.

  open-ended chat  vLLM's chat handler fills an omitted max_tokens with max_model_len -
                   prompt before the SamplingParams exist, so admission would see the
                   largest possible request. The request object still knows: a chat
                   completion with neither max_tokens nor max_completion_tokens marks its
                   SamplingParams open-ended (admission.OPEN_ENDED_ATTR).
  boolean factor   the request schema turns JSON `true` into 1 for vllm_xargs' int-or-float
                   values, so `"yarn_factor": true` would arrive as s = 1. Only the raw
                   body shows it: an ASGI middleware refuses it with 400, as admission
                   refuses a boolean offline.
"""

from __future__ import annotations

import json

from yarn_vllm.vllm_seam.admission import OPEN_ENDED_ATTR, RequestError
from yarn_vllm.vllm_seam.patching import run_after
from yarn_vllm.yarn.scale_policy import REQUEST_FACTOR_KEY


def mark_open_ended(request, params, *args, **kwargs) -> None:
    """After ChatCompletionRequest.to_sampling_params: flag a request that set no length."""
    if request.max_tokens is None and request.max_completion_tokens is None:
        setattr(params, OPEN_ENDED_ATTR, True)


def boolean_factor(body: bytes) -> RequestError | None:
    """The refusal for a JSON body whose vllm_xargs.yarn_factor is a boolean, else None."""
    if REQUEST_FACTOR_KEY.encode() not in body:
        return None  # the common case costs one substring search
    try:
        xargs = json.loads(body).get("vllm_xargs")
    except (ValueError, AttributeError):
        return None  # vLLM answers malformed JSON itself
    value = xargs.get(REQUEST_FACTOR_KEY) if isinstance(xargs, dict) else None
    if not isinstance(value, bool):
        return None
    return RequestError(REQUEST_FACTOR_KEY, f"is {json.dumps(value)}, not a number",
                        "give a number from 1 to the model's YaRN factor, or omit it")


class BooleanFactorGuard:
    """ASGI middleware: POST bodies with a boolean `vllm_xargs.yarn_factor` get a 400."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or scope.get("method") != "POST":
            return await self.app(scope, receive, send)
        chunks, more = [], True
        while more:
            message = await receive()
            if message["type"] != "http.request":  # the client left before its body ended
                return await self.app(scope, _replay([message], receive), send)
            chunks.append(message.get("body", b""))
            more = message.get("more_body", False)
        body = b"".join(chunks)
        error = boolean_factor(body)
        if error is None:
            replayed = {"type": "http.request", "body": body, "more_body": False}
            return await self.app(scope, _replay([replayed], receive), send)
        payload = json.dumps({"error": {"message": str(error), "type": "BadRequestError",
                                        "param": REQUEST_FACTOR_KEY, "code": 400}}).encode()
        await send({"type": "http.response.start", "status": 400,
                    "headers": [(b"content-type", b"application/json"),
                                (b"content-length", str(len(payload)).encode())]})
        await send({"type": "http.response.body", "body": payload})


def _replay(messages: list, receive):
    async def replayed():
        return messages.pop(0) if messages else await receive()
    return replayed


def install() -> None:
    """Hook the chat request type and the server's app builder. Safe to call repeatedly."""
    from vllm.entrypoints.launchers.api_server import entry
    from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest

    run_after(ChatCompletionRequest, "to_sampling_params", mark_open_ended)
    run_after(entry, "build_app", lambda *args: _guard(args[1]))


def _guard(app) -> None:
    """Put BooleanFactorGuard in front of a built Starlette app (vLLM's build_app has already
    assembled its middleware, so add_middleware is refused)."""
    if app.middleware_stack is None:
        app.middleware_stack = app.build_middleware_stack()
    if not isinstance(app.middleware_stack, BooleanFactorGuard):
        app.middleware_stack = BooleanFactorGuard(app.middleware_stack)
