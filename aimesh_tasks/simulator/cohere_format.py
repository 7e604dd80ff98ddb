"""Cohere Chat API v2 wire format: POST /v2/chat, its errors, its usage and its SSE stream.

Contributes ``ROUTES`` to the simulator app (see `server.WIRE_FORMATS`). What it answers:

| case                         | status | body / headers                                           |
|------------------------------|--------|----------------------------------------------------------|
| no `Authorization: Bearer`   | 401    | `{"id", "message": "no api key supplied"}`               |
| invalid body                 | 400    | `{"id", "message": "invalid request: <field> ..."}`      |
| model not in `known_models`  | 404    | `{"id", "message": "model '<m>' not found, ..."}`        |
| fault `server_error`         | 500    | `{"id", "message"}`                                      |
| fault `throttled`            | 429    | `{"id", "message"}`, Retry-After, trial headers (0 left) |
| fault `overloaded`           | 503    | `{"id", "message"}`, Retry-After                         |
| fault `malformed`            | 200    | the JSON body cut short (non-streaming requests)         |
| fault `no_usage`             | 200    | no `usage` (in a stream: none in `message-end`)          |
| success                      | 200    | `{id, finish_reason, message: {role, content}, usage}`   |
| success, `"stream": true`    | 200    | SSE: message-start, content-start, content-delta...,     |
|                              |        | content-end, message-end (finish_reason and usage),      |
|                              |        | written event by event (simulator/streaming.py)          |

Text and token counts come from `tokens.complete`, so they equal the OpenAI format's for
the same chat; `usage.billed_units` carries them (the call log records them), while
`usage.tokens.input_tokens` adds the prompt template Cohere's own examples show
(`PROMPT_TEMPLATE_TOKENS`). Every answer carries the trial-key headers
`x-trial-endpoint-call-limit`/`-remaining` (counting down over each `TRIAL_CALL_LIMIT`
calls since start or reset) and `x-endpoint-monthly-call-limit`.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

from aiohttp import web
from aiohttp.typedefs import Handler

from aimesh_tasks.simulator import tokens
from aimesh_tasks.simulator.streaming import Billing, Piece, stream

if TYPE_CHECKING:
    from aimesh_tasks.simulator.server import Call, Route, SimState

PATH: Final = "/v2/chat"
# Cohere's documented examples bill 5 and 3 input tokens where the model saw 71 and 69.
PROMPT_TEMPLATE_TOKENS: Final = 66
# Trial keys: 20 Chat calls a minute, 1,000 calls a month (docs: rate limits).
TRIAL_CALL_LIMIT: Final = 20
MONTHLY_CALL_LIMIT: Final = 1000

_ENCODER: Final = json.JSONEncoder(separators=(",", ":"), check_circular=False)
_ROLES: Final = ("system", "user", "assistant", "tool")
_FINISH_REASONS: Final = {"stop": "COMPLETE", "length": "MAX_TOKENS"}
_BEARER: Final = re.compile(r"^bearer\s+\S+", re.IGNORECASE)
# Injected fault -> (status, message), in the shape of Cohere's documented error bodies.
_FAULT_ERRORS: Final = {
    "server_error": (500, "internal server error, this has been reported to our developers."
                          " (simulated)"),
    "throttled": (429, "You are past the per minute request limit, please wait and try again"
                       " later. (simulated)"),
    "overloaded": (503, "service unavailable, please try again later. (simulated)"),
}


class RequestError(ValueError):
    """A request body Cohere would answer with 400; `field` names the offending field."""

    def __init__(self, message: str, field: str | None) -> None:
        super().__init__(message)
        self.field = field


@dataclass(frozen=True, slots=True)
class ChatRequest:
    """The parts of a Chat v2 request the simulator acts on."""

    model: str
    messages: list[tokens.Message]
    max_tokens: int | None
    stream: bool


def parse_request(raw: bytes) -> ChatRequest:
    """Validate a request body; RequestError names the offending field."""
    try:
        body = json.loads(raw)
    except ValueError:
        raise RequestError("invalid json syntax: the request body is not valid JSON.",
                           None) from None
    if not isinstance(body, dict):
        raise RequestError("invalid request: the request body must be a JSON object.", None)
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise RequestError("invalid request: 'model' is required and must be a non-empty "
                           "string.", "model")
    _check_sampling(body)
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise RequestError("invalid request: 'stream' must be a boolean.", "stream")
    return ChatRequest(model, _messages(body.get("messages")), _max_tokens(body), stream)


def _messages(value: object) -> list[tokens.Message]:
    if not isinstance(value, list) or not value:
        raise RequestError("invalid request: 'messages' must be a non-empty array of "
                           "message objects.", "messages")
    messages: list[tokens.Message] = []
    for index, message in enumerate(value):
        where = f"messages[{index}]"
        if not isinstance(message, dict):
            raise RequestError(f"invalid request: {where} must be an object.", where)
        role = message.get("role")
        if role not in _ROLES:
            raise RequestError(f"invalid request: {where}.role must be one of "
                               f"{', '.join(_ROLES)} (got {role!r}).", f"{where}.role")
        messages.append((role, _content(message.get("content"), f"{where}.content")))
    return messages


def _content(value: object, where: str) -> str:
    """A string, or a list of `{"type": "text", "text": ...}` items joined."""
    if isinstance(value, str):
        return value
    if isinstance(value, list) and all(
        isinstance(item, dict) and item.get("type") == "text"
        and isinstance(item.get("text"), str) for item in value
    ):
        return "".join(item["text"] for item in value)
    raise RequestError(f"invalid request: {where} must be a string or an array of "
                       "{\"type\": \"text\", \"text\": ...} items.", where)


def _max_tokens(body: dict[str, Any]) -> int | None:
    value = body.get("max_tokens")
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise RequestError("invalid request: 'max_tokens' must be an integer >= 1.",
                           "max_tokens")
    return value


def _number(body: dict[str, Any], name: str, low: float, high: float) -> None:
    value = body.get(name)
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int | float) or not low <= value <= high:
        raise RequestError(f"invalid request: '{name}' must be a number between {low:g} and "
                           f"{high:g} inclusive.", name)


def _check_sampling(body: dict[str, Any]) -> None:
    """temperature >= 0, p in [0.01, 0.99], at most 5 string stop_sequences (API reference)."""
    _number(body, "temperature", 0.0, float("inf"))
    _number(body, "p", 0.01, 0.99)
    stops = body.get("stop_sequences")
    if stops is not None and not (
        isinstance(stops, list) and len(stops) <= 5 and all(isinstance(s, str) for s in stops)
    ):
        raise RequestError("invalid request: 'stop_sequences' must be an array of at most 5 "
                           "strings.", "stop_sequences")


def error_body(id_: str, message: str) -> dict[str, Any]:
    """A Cohere error body."""
    return {"id": id_, "message": message}


def usage(completion: tokens.Completion) -> dict[str, Any]:
    """The usage object: billed units, and the tokens the model saw (template included)."""
    return {
        "billed_units": {"input_tokens": completion.prompt_tokens,
                         "output_tokens": completion.completion_tokens},
        "tokens": {"input_tokens": completion.prompt_tokens + PROMPT_TEMPLATE_TOKENS,
                   "output_tokens": completion.completion_tokens},
    }


def chat_body(id_: str, completion: tokens.Completion) -> dict[str, Any]:
    """A non-streaming chat response."""
    return {
        "id": id_,
        "finish_reason": _FINISH_REASONS[completion.finish_reason],
        "message": {"role": "assistant",
                    "content": [{"type": "text", "text": completion.text}]},
        "usage": usage(completion),
    }


def stream_events(id_: str, completion: tokens.Completion, with_usage: bool = True
                  ) -> Iterator[dict[str, Any]]:
    """The events of a streamed chat response, in order."""
    yield {"id": id_, "type": "message-start",
           "delta": {"message": {"role": "assistant", "content": [], "tool_plan": "",
                                 "tool_calls": [], "citations": []}}}
    yield {"type": "content-start", "index": 0,
           "delta": {"message": {"content": {"type": "text", "text": ""}}}}
    for index, word in enumerate(completion.words):
        text = word if index == 0 else " " + word
        yield {"type": "content-delta", "index": 0,
               "delta": {"message": {"content": {"text": text}}}}
    yield {"type": "content-end", "index": 0}
    end: dict[str, Any] = {"finish_reason": _FINISH_REASONS[completion.finish_reason]}
    if with_usage:
        end["usage"] = usage(completion)
    yield {"type": "message-end", "delta": end}


def sse_pieces(events: Iterator[dict[str, Any]]) -> Iterator[Piece]:
    """Server-sent events, each named by its type: a word per content-delta, the tail from
    content-end on."""
    for event in events:
        kind = event["type"]
        yield Piece(f"event: {kind}\ndata: {_ENCODER.encode(event)}\n\n".encode(),
                    words=int(kind == "content-delta"), tail=kind in ("content-end",
                                                                     "message-end"))


def _unknown_model(model: str) -> str:
    return (f"model '{model}' not found, make sure the correct model ID was used and that "
            "you have access to the model.")


def _call_id(state: SimState, call: Call) -> str:
    return f"{state.instance}-0000-4000-8000-{call.serial:012x}"


def _trial_headers(call: Call, remaining: int | None = None) -> dict[str, str]:
    left = TRIAL_CALL_LIMIT - 1 - (call.n - 1) % TRIAL_CALL_LIMIT if remaining is None \
        else remaining
    return {"x-endpoint-monthly-call-limit": str(MONTHLY_CALL_LIMIT),
            "x-trial-endpoint-call-limit": str(TRIAL_CALL_LIMIT),
            "x-trial-endpoint-call-remaining": str(left)}


def _json(body: dict[str, Any], call: Call, status: int = 200,
          headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(body=_ENCODER.encode(body).encode(), status=status,
                        headers={**_trial_headers(call), **(headers or {})},
                        content_type="application/json")


def _fault_response(state: SimState, call: Call, fault: str) -> web.Response:
    status, message = _FAULT_ERRORS[fault]
    headers: dict[str, str] = {}
    if status in (429, 503):
        headers["Retry-After"] = str(state.config.retry_after_s)
    if status == 429:
        headers.update(_trial_headers(call, remaining=0))
    return _json(error_body(_call_id(state, call), message), call, status, headers)


def _authorized(request: web.Request) -> str | None:
    """None if the request carries a bearer key, else the message Cohere answers 401 with."""
    value = request.headers.get("Authorization")
    if value is None:
        return "no api key supplied"
    return None if _BEARER.match(value) else "invalid api token"


def chat(state: SimState) -> Handler:
    """The ``POST /v2/chat`` handler bound to one simulator's state."""

    async def handle(request: web.Request) -> web.StreamResponse:
        call = state.begin(request)
        raw = await request.read()
        await state.wait(call)
        refusal = _authorized(request)
        if refusal is not None:
            state.finish(call, 401)
            return _json(error_body(_call_id(state, call), refusal), call, 401)
        try:
            chat_request = parse_request(raw)
        except RequestError as exc:
            state.finish(call, 400)
            return _json(error_body(_call_id(state, call), str(exc)), call, 400)
        config = state.config
        model = config.model_name or chat_request.model
        if not config.knows(chat_request.model):
            state.finish(call, 404, chat_request.model)
            return _json(error_body(_call_id(state, call), _unknown_model(chat_request.model)),
                         call, 404)
        if call.fault in _FAULT_ERRORS:
            state.finish(call, _FAULT_ERRORS[call.fault][0], model)
            return _fault_response(state, call, call.fault)
        completion = tokens.complete(config.seed, config.completion_tokens,
                                     chat_request.messages, chat_request.max_tokens)
        id_ = _call_id(state, call)
        with_usage = call.fault != "no_usage"
        if chat_request.stream:
            return await stream(state, call, request,
                                sse_pieces(stream_events(id_, completion, with_usage)),
                                Billing(model, completion.prompt_tokens), _trial_headers(call))
        state.finish(call, 200, model, completion.prompt_tokens, completion.completion_tokens)
        body = chat_body(id_, completion)
        if not with_usage:
            del body["usage"]
        if call.fault == "malformed":
            return web.Response(body=_ENCODER.encode(body).encode()[:-7], status=200,
                                headers=_trial_headers(call), content_type="application/json")
        return _json(body, call)

    return handle


ROUTES: Final[tuple[Route, ...]] = (("POST", PATH, chat),)
