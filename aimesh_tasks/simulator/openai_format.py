"""OpenAI Chat Completions wire format: request checks, response, chunk and error bodies.

Contributes ``ROUTES`` to the simulator app (see `server.WIRE_FORMATS`). Other provider
formats (Anthropic, Gemini, Cohere) are sibling modules with the same shape. A streamed
answer is written chunk by chunk (simulator/streaming.py: pausing, and the billing of a
stream the client cuts off).
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

from aiohttp import web
from aiohttp.typedefs import Handler

from aimesh_tasks.simulator import tokens
from aimesh_tasks.simulator.streaming import Billing, Piece, stream

if TYPE_CHECKING:
    from aimesh_tasks.simulator.server import Route, SimState

DEFAULT_MODEL: Final = "sim-model"

_ENCODER: Final = json.JSONEncoder(separators=(",", ":"), check_circular=False)
# Injected fault -> (status, error object), from the documented OpenAI error bodies.
_FAULT_ERRORS: Final[dict[str, tuple[int, dict[str, Any]]]] = {
    "server_error": (500, {
        "message": "The server had an error while processing your request. (simulated)",
        "type": "server_error", "param": None, "code": None,
    }),
    "throttled": (429, {
        "message": "Rate limit reached for requests. (simulated)",
        "type": "requests", "param": None, "code": "rate_limit_exceeded",
    }),
    "overloaded": (503, {
        "message": "The engine is currently overloaded, please try again later. (simulated)",
        "type": "server_error", "param": None, "code": None,
    }),
}
_FAULT_BODIES: Final = {fault: (status, _ENCODER.encode({"error": e}).encode())
                        for fault, (status, e) in _FAULT_ERRORS.items()}


class RequestError(ValueError):
    """A request body the OpenAI API would answer with 400."""

    def __init__(self, message: str, param: str | None) -> None:
        super().__init__(message)
        self.param = param


@dataclass(frozen=True, slots=True)
class ChatRequest:
    """The parts of a Chat Completions request the simulator acts on."""

    model: str
    messages: list[tokens.Message]
    max_tokens: int | None
    stream: bool
    include_usage: bool


def parse_request(raw: bytes) -> ChatRequest:
    """Validate a request body; RequestError names the offending param."""
    try:
        body = json.loads(raw)
    except ValueError:
        raise RequestError("We could not parse the JSON body of your request.", None) from None
    if not isinstance(body, dict):
        raise RequestError("The request body must be a JSON object.", None)
    model = body.get("model", DEFAULT_MODEL)
    if not isinstance(model, str):
        raise RequestError("'model' must be a string.", "model")
    stream, include_usage = _stream_flags(body)
    return ChatRequest(model, _messages(body.get("messages")), _max_tokens(body), stream,
                       include_usage)


def _messages(value: object) -> list[tokens.Message]:
    if not isinstance(value, list) or not value:
        raise RequestError("'messages' must be a non-empty array of message objects.",
                           "messages")
    messages: list[tokens.Message] = []
    for index, message in enumerate(value):
        if not isinstance(message, dict):
            raise RequestError(f"messages[{index}] must be an object.", f"messages[{index}]")
        role, content = message.get("role"), message.get("content")
        if not isinstance(role, str):
            raise RequestError(f"messages[{index}].role must be a string.",
                               f"messages[{index}].role")
        if not isinstance(content, str):
            raise RequestError(f"messages[{index}].content must be a string.",
                               f"messages[{index}].content")
        messages.append((role, content))
    return messages


def _max_tokens(body: dict[str, Any]) -> int | None:
    for name in ("max_completion_tokens", "max_tokens"):
        value = body.get(name)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise RequestError(f"'{name}' must be an integer >= 1.", name)
        return value
    return None


def _stream_flags(body: dict[str, Any]) -> tuple[bool, bool]:
    stream = _flag(body, "stream", "stream")
    options = body.get("stream_options")
    if options is None:
        return stream, False
    if not isinstance(options, dict):
        raise RequestError("'stream_options' must be an object.", "stream_options")
    return stream, _flag(options, "include_usage", "stream_options.include_usage")


def _flag(mapping: dict[str, Any], name: str, param: str) -> bool:
    value = mapping.get(name)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise RequestError(f"'{param}' must be a boolean.", param)
    return value


def error_body(message: str, param: str | None) -> dict[str, Any]:
    """An OpenAI-style invalid_request_error body."""
    error = {"message": message, "type": "invalid_request_error", "param": param, "code": None}
    return {"error": error}


def unknown_model(model: str, status: int) -> tuple[int, dict[str, Any]]:
    """OpenAI's answer to a model it does not serve (404 `model_not_found`), or with
    `status` 400 the LiteLLM proxy's (its code is the status, the model is in the text)."""
    if status == 400:
        return 400, {"error": {
            "message": f"/chat/completions: Invalid model name passed in model={model}. "
                       "Call `/v1/models` to view available models for your key.",
            "type": "None", "param": "None", "code": "400"}}
    return 404, {"error": {
        "message": f"The model `{model}` does not exist or you do not have access to it.",
        "type": "invalid_request_error", "param": None, "code": "model_not_found"}}


def usage(completion: tokens.Completion) -> dict[str, int]:
    """The usage object of a completion."""
    return {
        "prompt_tokens": completion.prompt_tokens,
        "completion_tokens": completion.completion_tokens,
        "total_tokens": completion.prompt_tokens + completion.completion_tokens,
    }


def completion_body(id_: str, model: str, completion: tokens.Completion) -> dict[str, Any]:
    """A non-streaming ``chat.completion`` object."""
    message = {"role": "assistant", "content": completion.text}
    choice = {"index": 0, "message": message, "logprobs": None,
              "finish_reason": completion.finish_reason}
    return {"id": id_, "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": [choice], "usage": usage(completion)}


def chunk_pieces(
    id_: str, model: str, completion: tokens.Completion, include_usage: bool,
    with_usage: bool = True,
) -> Iterator[Piece]:
    """The ``chat.completion.chunk`` events of a streamed completion, in order, ending with
    ``data: [DONE]``; with `include_usage`, every chunk has ``usage: null`` but the last,
    which has no choices and the usage (left out by the no_usage fault)."""
    head = {"id": id_, "object": "chat.completion.chunk", "created": int(time.time()),
            "model": model, **({"usage": None} if include_usage else {})}

    def chunk(delta: dict[str, str], finish_reason: str | None = None) -> dict[str, Any]:
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
        return {**head, "choices": [choice]}

    yield Piece(event(chunk({"role": "assistant", "content": ""})))
    for index, word in enumerate(completion.words):
        yield Piece(event(chunk({"content": word if index == 0 else " " + word})), words=1)
    yield Piece(event(chunk({}, completion.finish_reason)), tail=True)
    if include_usage and with_usage:
        yield Piece(event({**head, "choices": [], "usage": usage(completion)}), tail=True)
    yield Piece(b"data: [DONE]\n\n", tail=True)


def event(chunk: dict[str, Any]) -> bytes:
    """One server-sent event carrying a chunk."""
    return f"data: {_ENCODER.encode(chunk)}\n\n".encode()


def _json(payload: object, status: int = 200) -> web.Response:
    body = _ENCODER.encode(payload).encode()
    return web.Response(body=body, status=status, content_type="application/json")


def _fault_response(fault: str, retry_after_s: int) -> web.Response:
    status, body = _FAULT_BODIES[fault]
    headers = {"Retry-After": str(retry_after_s)} if status in (429, 503) else None
    return web.Response(body=body, status=status, headers=headers,
                        content_type="application/json")


def chat_completions(state: SimState) -> Handler:
    """The ``POST /v1/chat/completions`` handler bound to one simulator's state."""

    async def handle(request: web.Request) -> web.StreamResponse:
        call = state.begin(request)
        raw = await request.read()
        await state.wait(call)
        try:
            chat = parse_request(raw)
        except RequestError as exc:
            state.finish(call, 400)
            return _json(error_body(str(exc), exc.param), status=400)
        config = state.config
        model = config.model_name or chat.model
        if not config.knows(chat.model):
            status, error = unknown_model(chat.model, config.unknown_model_status)
            state.finish(call, status, chat.model)
            return _json(error, status=status)
        if call.fault in _FAULT_BODIES:
            status = _FAULT_BODIES[call.fault][0]
            state.finish(call, status, model)
            return _fault_response(call.fault, config.retry_after_s)
        completion = tokens.complete(config.seed, config.completion_tokens, chat.messages,
                                     chat.max_tokens)
        id_ = f"chatcmpl-{state.instance}{call.serial:08x}"
        if chat.stream:
            pieces = chunk_pieces(id_, model, completion, chat.include_usage,
                                  with_usage=call.fault != "no_usage")
            return await stream(state, call, request, pieces,
                                Billing(model, completion.prompt_tokens))
        state.finish(call, 200, model, completion.prompt_tokens, completion.completion_tokens)
        body = completion_body(id_, model, completion)
        if call.fault == "no_usage":
            del body["usage"]
        if call.fault == "malformed":
            return web.Response(body=_ENCODER.encode(body).encode()[:-7], status=200,
                                content_type="application/json")
        return _json(body)

    return handle


ROUTES: Final[tuple[Route, ...]] = (("POST", "/v1/chat/completions", chat_completions),)
