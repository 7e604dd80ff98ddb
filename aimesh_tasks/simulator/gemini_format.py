"""Google Gemini generateContent wire format: request checks, response, stream and error bodies.

Contributes ``ROUTES`` to the simulator app (see `server.WIRE_FORMATS`):
`POST /v1beta/models/{model}:generateContent` and `:streamGenerateContent` (`?alt=sse` for
server-sent events, written chunk by chunk: simulator/streaming.py; else one JSON array
of the chunks, as the API does).

Text and token counts come from `tokens.complete` over the request turned back into chat
messages (`systemInstruction` -> system, `user` -> user, `model` -> assistant), so the same
prompt gets the same words and figures as through the OpenAI format. Errors have Google's
shape, `{"error": {"code", "message", "status", "details"}}`; a 400 names the field in its
message and in a `google.rpc.BadRequest` field violation. A key (`x-goog-api-key` or
`?key=`) is optional here, as on a local endpoint, but one starting with ``invalid`` is
answered as the API answers a bad key: 400 INVALID_ARGUMENT, reason API_KEY_INVALID.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

from aiohttp import web
from aiohttp.typedefs import Handler

from aimesh_tasks.simulator import streaming, tokens
from aimesh_tasks.simulator.streaming import Piece

if TYPE_CHECKING:
    from aimesh_tasks.simulator.server import Call, Route, SimState

_ENCODER: Final = json.JSONEncoder(separators=(",", ":"), check_circular=False)
INVALID_KEY_PREFIX: Final = "invalid"
_TYPE: Final = "type.googleapis.com/google.rpc."
_TOP_LEVEL: Final = frozenset({"contents", "systemInstruction", "generationConfig",
                               "safetySettings", "tools", "toolConfig", "cachedContent"})
_ROLES: Final = {"user": "user", "model": "assistant"}
_FINISH: Final = {"stop": "STOP", "length": "MAX_TOKENS"}
# Injected fault -> (status, status name, message): the API's documented answers.
_FAULTS: Final[dict[str, tuple[int, str, str]]] = {
    "server_error": (500, "INTERNAL", "An internal error has occurred. Please retry or report "
                     "in https://developers.generativeai.google/guide/troubleshooting"),
    "throttled": (429, "RESOURCE_EXHAUSTED", "You exceeded your current quota, please check "
                  "your plan and billing details. For more information on this error, head "
                  "to: https://ai.google.dev/gemini-api/docs/rate-limits."),
    "overloaded": (503, "UNAVAILABLE", "The model is overloaded. Please try again later."),
}


class RequestError(ValueError):
    """A request the Gemini API would answer with 400 INVALID_ARGUMENT; `field` is the
    JSON path of the offending field (None when the body as a whole is wrong)."""

    def __init__(self, message: str, field: str | None) -> None:
        super().__init__(message)
        self.field = field


@dataclass(frozen=True, slots=True)
class GenerateRequest:
    """The parts of a generateContent request the simulator acts on."""

    messages: list[tokens.Message]
    max_tokens: int | None


def _snake(name: str) -> str:
    return re.sub(r"(?<!^)([A-Z])", r"_\1", name).lower()


def _get(mapping: dict[str, Any], name: str) -> Any:
    """A field by its JSON name or its proto (snake_case) name; the API takes both."""
    return mapping.get(name, mapping.get(_snake(name)))


def _invalid(field: str, rule: str) -> RequestError:
    return RequestError(f"* GenerateContentRequest.{field}: {rule}\n", field)


def parse_request(raw: bytes) -> GenerateRequest:
    """Validate a request body; RequestError names the offending field."""
    try:
        body = json.loads(raw)
    except ValueError:
        raise RequestError("Invalid JSON payload received. Unexpected token.", None) from None
    if not isinstance(body, dict):
        raise RequestError("Invalid JSON payload received. Expected an object.", None)
    for name in body:
        if name not in _TOP_LEVEL and not any(_snake(k) == name for k in _TOP_LEVEL):
            raise RequestError(
                f'Invalid JSON payload received. Unknown name "{name}": Cannot find field.', name)
    system = _get(body, "systemInstruction")
    messages = [("system", _text(system, "systemInstruction"))] if system is not None else []
    messages += _contents(body.get("contents"))
    return GenerateRequest(messages, _max_tokens(_get(body, "generationConfig")))


def _contents(value: object) -> list[tokens.Message]:
    if not isinstance(value, list) or not value:
        raise _invalid("contents", "contents is not specified")
    messages: list[tokens.Message] = []
    for index, content in enumerate(value):
        field = f"contents[{index}]"
        if not isinstance(content, dict):
            raise _invalid(field, "must be a Content object")
        role = content.get("role", "user")
        if role not in _ROLES:
            raise _invalid(f"{field}.role", "Please use a valid role: user, model.")
        messages.append((_ROLES[role], _text(content, field)))
    return messages


def _text(content: object, field: str) -> str:
    """The joined text parts of a Content object."""
    parts = content.get("parts") if isinstance(content, dict) else None
    if not isinstance(parts, list) or not parts:
        raise _invalid(f"{field}.parts", "contents.parts must not be empty.")
    texts: list[str] = []
    for index, part in enumerate(parts):
        text = part.get("text") if isinstance(part, dict) else None
        if not isinstance(text, str):
            raise _invalid(f"{field}.parts[{index}].text",
                           "only text parts are simulated; text must be a string")
        texts.append(text)
    return "".join(texts)


def _max_tokens(config: object) -> int | None:
    if config is None:
        return None
    if not isinstance(config, dict):
        raise _invalid("generationConfig", "must be a GenerationConfig object")
    _check_number(config, "temperature", 2.0)
    _check_number(config, "topP", 1.0)
    stops = _get(config, "stopSequences")
    if stops is not None and not (isinstance(stops, list) and len(stops) <= 5
                                  and all(isinstance(s, str) for s in stops)):
        raise _invalid("generationConfig.stopSequences", "must be at most 5 strings")
    value = _get(config, "maxOutputTokens")
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise _invalid("generationConfig.maxOutputTokens", "must be an integer >= 1")
    return value


def _check_number(config: dict[str, Any], name: str, highest: float) -> None:
    value = _get(config, name)
    if value is not None and (isinstance(value, bool) or not isinstance(value, int | float)
                              or not 0 <= value <= highest):
        raise _invalid(f"generationConfig.{name}", f"must be a number in [0, {highest:g}]")


def error_body(code: int, status: str, message: str,
               details: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """Google's error envelope."""
    error: dict[str, Any] = {"code": code, "message": message, "status": status}
    if details:
        error["details"] = details
    return {"error": error}


def bad_request_body(exc: RequestError) -> dict[str, Any]:
    """The 400 INVALID_ARGUMENT body of a rejected request, naming its field."""
    violation = {"description": str(exc).strip(), **({"field": exc.field} if exc.field else {})}
    details = [{"@type": f"{_TYPE}BadRequest", "fieldViolations": [violation]}]
    return error_body(400, "INVALID_ARGUMENT", str(exc), details)


def bad_key_body() -> dict[str, Any]:
    """The API's answer to a key it does not accept."""
    message = "API key not valid. Please pass a valid API key."
    details = [{"@type": f"{_TYPE}ErrorInfo", "reason": "API_KEY_INVALID",
                "domain": "googleapis.com",
                "metadata": {"service": "generativelanguage.googleapis.com"}}]
    return error_body(400, "INVALID_ARGUMENT", message, details)


def unknown_model_body(model: str) -> dict[str, Any]:
    """The API's 404 NOT_FOUND for a model it does not serve."""
    return error_body(404, "NOT_FOUND", f"models/{model} is not found for API version "
                      "v1beta, or is not supported for generateContent. Call ListModels to "
                      "see the list of available models and their supported methods.")


def fault_body(fault: str, model: str, retry_after_s: int) -> tuple[int, dict[str, Any]]:
    """The status and body of an injected fault (a 429 carries QuotaFailure and RetryInfo)."""
    status, name, message = _FAULTS[fault]
    details: list[dict[str, Any]] = []
    if status == 429:
        violation = {"quotaMetric": "generativelanguage.googleapis.com/"
                                    "generate_content_free_tier_requests",
                     "quotaId": "GenerateRequestsPerMinutePerProjectPerModel-FreeTier",
                     "quotaDimensions": {"location": "global", "model": model}}
        details = [{"@type": f"{_TYPE}QuotaFailure", "violations": [violation]},
                   {"@type": f"{_TYPE}RetryInfo", "retryDelay": f"{retry_after_s}s"}]
    return status, error_body(status, name, f"{message} (simulated)", details)


def usage_metadata(prompt_tokens: int, output_tokens: int) -> dict[str, Any]:
    """A `usageMetadata` object."""
    return {"promptTokenCount": prompt_tokens, "candidatesTokenCount": output_tokens,
            "totalTokenCount": prompt_tokens + output_tokens,
            "promptTokensDetails": [{"modality": "TEXT", "tokenCount": prompt_tokens}]}


def _response(id_: str, model: str, text: str, finish: str | None,
              usage: dict[str, Any] | None) -> dict[str, Any]:
    candidate: dict[str, Any] = {"content": {"parts": [{"text": text}], "role": "model"}}
    if finish is not None:
        candidate["finishReason"] = finish
    candidate["index"] = 0
    body: dict[str, Any] = {"candidates": [candidate]}
    if usage is not None:
        body["usageMetadata"] = usage
    return {**body, "modelVersion": model, "responseId": id_}


def response_body(id_: str, model: str, completion: tokens.Completion,
                  with_usage: bool = True) -> dict[str, Any]:
    """A non-streamed GenerateContentResponse."""
    usage = usage_metadata(completion.prompt_tokens, completion.completion_tokens)
    return _response(id_, model, completion.text, _FINISH[completion.finish_reason],
                     usage if with_usage else None)


def chunk_bodies(id_: str, model: str, completion: tokens.Completion,
                 with_usage: bool = True) -> Iterator[dict[str, Any]]:
    """The GenerateContentResponse chunks of a stream: one per word, each with the usage so
    far (as the API sends it), the last with the finishReason."""
    words = completion.words
    for index, word in enumerate(words):
        last = index == len(words) - 1
        usage = usage_metadata(completion.prompt_tokens, index + 1) if with_usage else None
        yield _response(id_, model, word if index == 0 else " " + word,
                        _FINISH[completion.finish_reason] if last else None, usage)


def sse_pieces(chunks: Iterator[dict[str, Any]]) -> Iterator[Piece]:
    """Server-sent events, one `data:` line (CRLF-framed) and one word per chunk; the last
    chunk, with the finishReason, is the tail; the stream just ends (no [DONE])."""
    for chunk in chunks:
        last = chunk["candidates"][0].get("finishReason") is not None
        yield Piece(f"data: {_ENCODER.encode(chunk)}\r\n\r\n".encode(), words=1, tail=last)


def _json(payload: object, status: int = 200, headers: dict[str, str] | None = None
          ) -> web.Response:
    return web.Response(body=_ENCODER.encode(payload).encode(), status=status, headers=headers,
                        content_type="application/json")


def _refusal(request: web.Request, raw: bytes) -> web.Response | GenerateRequest:
    """The 400 a bad key or a bad body gets, else the parsed request."""
    key = request.headers.get("x-goog-api-key") or request.query.get("key") or ""
    if key.startswith(INVALID_KEY_PREFIX):
        return _json(bad_key_body(), status=400)
    try:
        return parse_request(raw)
    except RequestError as exc:
        return _json(bad_request_body(exc), status=400)


async def _answer(state: SimState, call: Call, request: web.Request, generate: GenerateRequest,
                  stream: bool) -> web.StreamResponse:
    config = state.config
    model = config.model_name or request.match_info["model"]
    if not config.knows(request.match_info["model"]):
        state.finish(call, 404, request.match_info["model"])
        return _json(unknown_model_body(request.match_info["model"]), status=404)
    if call.fault in _FAULTS:
        status, body = fault_body(call.fault, model, config.retry_after_s)
        state.finish(call, status, model)
        retry = {"Retry-After": str(config.retry_after_s)} if status in (429, 503) else None
        return _json(body, status=status, headers=retry)
    completion = tokens.complete(config.seed, config.completion_tokens, generate.messages,
                                 generate.max_tokens)
    id_ = f"sim-{state.instance}{call.serial:08x}"
    with_usage = call.fault != "no_usage"
    if stream and request.query.get("alt") == "sse":
        return await streaming.stream(
            state, call, request, sse_pieces(chunk_bodies(id_, model, completion, with_usage)),
            streaming.Billing(model, completion.prompt_tokens))
    state.finish(call, 200, model, completion.prompt_tokens, completion.completion_tokens)
    if stream:
        return _json(list(chunk_bodies(id_, model, completion, with_usage)))
    encoded = _ENCODER.encode(response_body(id_, model, completion, with_usage)).encode()
    if call.fault == "malformed":
        encoded = encoded[:-7]
    return web.Response(body=encoded, status=200, content_type="application/json")


def _handler(state: SimState, stream: bool) -> Handler:
    async def handle(request: web.Request) -> web.StreamResponse:
        call = state.begin(request)
        raw = await request.read()
        await state.wait(call)
        parsed = _refusal(request, raw)
        if isinstance(parsed, web.Response):
            state.finish(call, 400)
            return parsed
        return await _answer(state, call, request, parsed, stream)

    return handle


def generate_content(state: SimState) -> Handler:
    """The ``POST /v1beta/models/{model}:generateContent`` handler of one simulator."""
    return _handler(state, stream=False)


def stream_generate_content(state: SimState) -> Handler:
    """The ``POST /v1beta/models/{model}:streamGenerateContent`` handler of one simulator."""
    return _handler(state, stream=True)


ROUTES: Final[tuple[Route, ...]] = (
    ("POST", "/v1beta/models/{model}:generateContent", generate_content),
    ("POST", "/v1beta/models/{model}:streamGenerateContent", stream_generate_content),
)
