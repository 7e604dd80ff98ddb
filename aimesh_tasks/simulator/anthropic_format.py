"""Anthropic Messages wire format: request checks, message, stream events and error bodies.

Contributes ``ROUTES`` (``POST /v1/messages``) to the simulator app (see
`server.WIRE_FORMATS`). As the real API does, a request needs a key (``x-api-key``, or
``Authorization: Bearer`` as newer SDKs send it; any value) and an ``anthropic-version``
header: without the key the answer is 401 ``authentication_error``, so a call that
succeeds shows it carried the provider's auth header. Errors are
``{"type": "error", "error": {"type", "message"}, "request_id"}``; a 400 names the field
first in its message, as the API does (``"max_tokens: Field required"``).

System prompts (the top-level ``system``, a string or text blocks) count as system
messages before the turns, so a prompt gives the same text and token figures here as in
the OpenAI format (tokens.py). Injected faults: server_error → 500 ``api_error``;
throttled → 429 ``rate_limit_error`` with Retry-After and the rate-limit headers;
overloaded → 529 ``overloaded_error`` with Retry-After; malformed → 200 with a cut JSON
body; no_usage → 200 without ``usage`` (in a stream: none in message_start or
message_delta). Streams follow the documented event flow, written event by event
(simulator/streaming.py): message_start, content_block_start, ping, content_block_delta
per word, content_block_stop, message_delta (stop reason and output tokens), message_stop.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any, Final

from aiohttp import web
from aiohttp.typedefs import Handler

from aimesh_tasks.simulator import tokens
from aimesh_tasks.simulator.streaming import Billing, Piece, stream

if TYPE_CHECKING:
    from aimesh_tasks.simulator.server import Call, Route, SimState

_ENCODER: Final = json.JSONEncoder(separators=(",", ":"), check_circular=False)
_ROLES: Final = ("user", "assistant")
# Injected fault -> (status, error type, message), after the documented error bodies.
_FAULT_ERRORS: Final = {
    "server_error": (500, "api_error", "Internal server error (simulated)"),
    "throttled": (429, "rate_limit_error",
                  "This request would exceed your organization's rate limit of requests "
                  "per minute. (simulated)"),
    "overloaded": (529, "overloaded_error", "Overloaded (simulated)"),
}


class RequestError(ValueError):
    """A request the Messages API would refuse: its status, error type and message."""

    def __init__(self, message: str, status: int = 400,
                 kind: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.status = status
        self.kind = kind


@dataclass(frozen=True, slots=True)
class MessagesRequest:
    """The parts of a Messages request the simulator acts on."""

    model: str
    messages: list[tokens.Message]  # system blocks first, as ("system", text)
    max_tokens: int
    stream: bool


def check_headers(headers: Mapping[str, str]) -> None:
    """A key and an API version are required; RequestError (401 / 400) if one is missing."""
    bearer = headers.get("Authorization", "").startswith("Bearer ")
    if not headers.get("x-api-key") and not bearer:
        raise RequestError("x-api-key header is required", 401, "authentication_error")
    if not headers.get("anthropic-version"):
        raise RequestError("anthropic-version: header is required")


def parse_request(raw: bytes) -> MessagesRequest:
    """Validate a request body; the RequestError message starts with the field's path."""
    try:
        body = json.loads(raw)
    except ValueError:
        raise RequestError("There was an error parsing the body of your request as JSON."
                           ) from None
    if not isinstance(body, dict):
        raise RequestError("body: Input should be an object")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise RequestError("model: Field required" if model is None
                           else "model: Input should be a non-empty string")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise RequestError("stream: Input should be a valid boolean")
    _check_temperature(body.get("temperature"))
    system = _system(body.get("system"))
    return MessagesRequest(model, [*system, *_messages(body.get("messages"))],
                           _max_tokens(body.get("max_tokens")), stream)


def _max_tokens(value: object) -> int:
    if value is None:
        raise RequestError("max_tokens: Field required")
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise RequestError("max_tokens: Input should be an integer >= 1")
    return value


def _check_temperature(value: object) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value <= 1:
        raise RequestError("temperature: Input should be a number between 0 and 1")


def _text_of(value: object, field: str) -> str:
    """A content field: a string, or a list of text blocks (joined)."""
    if isinstance(value, str):
        return value
    if not isinstance(value, list):
        raise RequestError(f"{field}: Input should be a string or a list of content blocks")
    texts: list[str] = []
    for index, block in enumerate(value):
        if not isinstance(block, dict) or block.get("type") != "text":
            raise RequestError(f"{field}.{index}: the simulator accepts only text blocks")
        text = block.get("text")
        if not isinstance(text, str):
            raise RequestError(f"{field}.{index}.text: Input should be a valid string")
        texts.append(text)
    return "".join(texts)


def _system(value: object) -> list[tokens.Message]:
    if value is None:
        return []
    if isinstance(value, list):  # each text block counts as one system message
        return [("system", _text_of([block], f"system.{i}")) for i, block in enumerate(value)]
    return [("system", _text_of(value, "system"))]


def _messages(value: object) -> list[tokens.Message]:
    if value is None:
        raise RequestError("messages: Field required")
    if not isinstance(value, list) or not value:
        raise RequestError("messages: Input should be a non-empty list")
    messages: list[tokens.Message] = []
    for index, message in enumerate(value):
        if not isinstance(message, dict):
            raise RequestError(f"messages.{index}: Input should be an object")
        role = message.get("role")
        if role not in _ROLES:
            raise RequestError(f"messages.{index}.role: Input should be 'user' or 'assistant'")
        messages.append((role, _text_of(message.get("content"), f"messages.{index}.content")))
    return messages


def error_body(kind: str, message: str, request_id: str) -> dict[str, Any]:
    """An Anthropic error body."""
    return {"type": "error", "error": {"type": kind, "message": message},
            "request_id": request_id}


def stop_reason(completion: tokens.Completion) -> str:
    """"max_tokens" when cut by max_tokens, else "end_turn"."""
    return "max_tokens" if completion.truncated else "end_turn"


def message_body(id_: str, model: str, completion: tokens.Completion) -> dict[str, Any]:
    """A non-streaming ``message`` object."""
    return {
        "id": id_, "type": "message", "role": "assistant", "model": model,
        "content": [{"type": "text", "text": completion.text}],
        "stop_reason": stop_reason(completion), "stop_sequence": None,
        "usage": {"input_tokens": completion.prompt_tokens,
                  "output_tokens": completion.completion_tokens},
    }


def stream_events(id_: str, model: str, completion: tokens.Completion
                  ) -> Iterator[tuple[str, dict[str, Any]]]:
    """The (event name, data) pairs of a streamed message, in the documented order."""
    start = {**message_body(id_, model, completion), "content": [], "stop_reason": None}
    start["usage"] = {"input_tokens": completion.prompt_tokens, "output_tokens": 0}
    yield "message_start", {"type": "message_start", "message": start}
    yield "content_block_start", {"type": "content_block_start", "index": 0,
                                  "content_block": {"type": "text", "text": ""}}
    yield "ping", {"type": "ping"}
    for index, word in enumerate(completion.words):
        delta = {"type": "text_delta", "text": word if index == 0 else " " + word}
        yield "content_block_delta", {"type": "content_block_delta", "index": 0,
                                      "delta": delta}
    yield "content_block_stop", {"type": "content_block_stop", "index": 0}
    yield "message_delta", {"type": "message_delta",
                            "delta": {"stop_reason": stop_reason(completion),
                                      "stop_sequence": None},
                            "usage": {"output_tokens": completion.completion_tokens}}
    yield "message_stop", {"type": "message_stop"}


def stream_pieces(id_: str, model: str, completion: tokens.Completion,
                  with_usage: bool = True) -> Iterator[Piece]:
    """The stream's events on the wire (``event:`` name and ``data:`` line each): a word
    per content_block_delta, the tail from content_block_stop on; the no_usage fault
    leaves the usage out of message_start and message_delta."""
    for name, data in stream_events(id_, model, completion):
        if not with_usage:
            data = {k: v for k, v in data.items() if k != "usage"}
            if name == "message_start":
                data["message"] = {k: v for k, v in data["message"].items() if k != "usage"}
        encoded = f"event: {name}\ndata: {_ENCODER.encode(data)}\n\n".encode()
        yield Piece(encoded, words=int(name == "content_block_delta"),
                    tail=name in ("content_block_stop", "message_delta", "message_stop"))


def _json(payload: object, status: int, headers: dict[str, str]) -> web.Response:
    return web.Response(body=_ENCODER.encode(payload).encode(), status=status,
                        headers=headers, content_type="application/json")


def _rfc3339(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def _fault_response(fault: str, retry_after_s: int, request_id: str) -> web.Response:
    status, kind, message = _FAULT_ERRORS[fault]
    headers = {"request-id": request_id}
    if status in (429, 529):
        headers["Retry-After"] = str(retry_after_s)
    if status == 429:
        reset = datetime.now(UTC) + timedelta(seconds=retry_after_s)
        headers.update({"anthropic-ratelimit-requests-remaining": "0",
                        "anthropic-ratelimit-requests-reset": _rfc3339(reset)})
    return _json(error_body(kind, message, request_id), status, headers)


def _answer(state: SimState, call: Call, parsed: MessagesRequest, request_id: str
            ) -> web.Response | tuple[Iterator[Piece], Billing]:
    """A fault's response, or the completed message (its events and billing when
    streamed)."""
    config = state.config
    model = config.model_name or parsed.model
    if not config.knows(parsed.model):  # the API's answer to a model it does not serve
        state.finish(call, 404, parsed.model)
        return _json(error_body("not_found_error", f"model: {parsed.model}", request_id), 404,
                     {"request-id": request_id})
    if call.fault in _FAULT_ERRORS:
        state.finish(call, _FAULT_ERRORS[call.fault][0], model)
        return _fault_response(call.fault, config.retry_after_s, request_id)
    completion = tokens.complete(config.seed, config.completion_tokens, parsed.messages,
                                 parsed.max_tokens)
    id_ = f"msg_{state.instance}{call.serial:08x}"
    if parsed.stream:
        return (stream_pieces(id_, model, completion, with_usage=call.fault != "no_usage"),
                Billing(model, completion.prompt_tokens))
    state.finish(call, 200, model, completion.prompt_tokens, completion.completion_tokens)
    body = message_body(id_, model, completion)
    if call.fault == "no_usage":
        del body["usage"]
    encoded = _ENCODER.encode(body).encode()
    if call.fault == "malformed":
        encoded = encoded[:-7]
    return web.Response(body=encoded, status=200, headers={"request-id": request_id},
                        content_type="application/json")


def messages(state: SimState) -> Handler:
    """The ``POST /v1/messages`` handler bound to one simulator's state."""

    async def handle(request: web.Request) -> web.StreamResponse:
        call = state.begin(request)
        raw = await request.read()
        await state.wait(call)
        request_id = f"req_{state.instance}{call.serial:08x}"
        try:
            check_headers(request.headers)
            parsed = parse_request(raw)
        except RequestError as exc:
            state.finish(call, exc.status)
            return _json(error_body(exc.kind, str(exc), request_id), exc.status,
                         {"request-id": request_id})
        answer = _answer(state, call, parsed, request_id)
        if isinstance(answer, tuple):
            return await stream(state, call, request, *answer, {"request-id": request_id})
        return answer

    return handle


ROUTES: Final[tuple[Route, ...]] = (("POST", "/v1/messages", messages),)
