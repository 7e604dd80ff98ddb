"""Cohere Chat API v2: POST /v2/chat with `Authorization: Bearer <key>`.

Requests carry `messages` (roles system, user, assistant, tool), `max_tokens`,
`temperature`, `p` and `stop_sequences`. Answers carry `message.content` as a list of
`{"type": "text", "text": ...}` items, `finish_reason` (COMPLETE, MAX_TOKENS,
STOP_SEQUENCE, TOOL_CALL, ERROR, ...) and `usage` with `billed_units` (what Cohere bills)
and `tokens` (everything the model saw, prompt template included); the call is charged
from `billed_units` when present.

Streamed (`"stream": true`), the answer is events named by their `type`: `message-start`
(the id), `content-start`, `content-delta` (text in `delta.message.content.text`),
`content-end`, then `message-end` with `delta.finish_reason` and `delta.usage` (the same
`billed_units` and `tokens` as a whole answer); tool and citation events add no answer
text.

Error bodies are `{"message": "..."}`, sometimes with an `"id"`. The statuses listed by the
API reference and the v2 SDK, and what they mean here:

| status | meaning                              | action                          |
|--------|--------------------------------------|---------------------------------|
| 400    | invalid request                      | fail (fallback if about model)  |
| 401    | key missing, invalid or expired      | fallback (auth)                 |
| 402    | billing limit reached                | fallback (payment_required)     |
| 403    | key not allowed                      | fallback (auth)                 |
| 404    | model not found                      | fallback (unknown_model)        |
| 422    | malformed request (unknown param)    | fail                            |
| 429    | rate limited (monthly cap: fallback) | retry                           |
| 498    | invalid token                        | fallback (auth)                 |
| 499    | request cancelled ("try again")      | retry                           |
| 500    | internal error                       | fallback (server_error)         |
| 503    | service unavailable                  | retry (overloaded)              |
| 504    | gateway timeout                      | fallback (timeout)              |

Cohere documents no rate-limit headers besides `Retry-After`; trial keys' answers carry
`x-trial-endpoint-call-limit` and `x-trial-endpoint-call-remaining`, read here as the
requests remaining.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

from aimesh_tasks.messages import AiMessage
from aimesh_tasks.providers.base import (
    Action,
    Completion,
    ErrorClass,
    ProviderRequest,
    RateLimits,
    excerpt,
    int_header,
    retry_after_s,
    status_class,
)
from aimesh_tasks.providers.sse import ParsedStream, SseEvent

_SYSTEM_ROLES = frozenset({"system", "developer"})
# Cohere's `p` must lie in [0.01, 0.99]; top_p 1.0 (no nucleus cut) maps to the widest.
_P_RANGE = (0.01, 0.99)
# Cohere's finish reasons in the OpenAI words the path compares against (a cut answer,
# "length", is never cached).
_FINISH_REASONS = {
    "COMPLETE": "stop",
    "STOP_SEQUENCE": "stop",
    "MAX_TOKENS": "length",
    "TOOL_CALL": "tool_calls",
    "ERROR": "error",
}
_BY_STATUS: dict[int, tuple[Action, str]] = {
    401: ("fallback", "auth"),
    402: ("fallback", "payment_required"),
    403: ("fallback", "auth"),
    498: ("fallback", "auth"),
    499: ("retry", "cancelled"),
    504: ("fallback", "timeout"),
}


def _chat_messages(message: AiMessage) -> list[dict[str, Any]]:
    """The chat in Cohere's shape: system and developer text joined into one system
    message first (Cohere: "system turn must be the first in the list"), the rest in
    order; names are dropped (Cohere has no `name`)."""
    system = [m.text() for m in message.messages if m.role in _SYSTEM_ROLES]
    turns: list[dict[str, Any]] = [{"role": "system", "content": "\n\n".join(system)}] \
        if system else []
    for m in message.messages:
        if m.role in _SYSTEM_ROLES:
            continue
        turn: dict[str, Any] = {"role": m.role, "content": m.text()}
        if m.tool_call_id is not None:
            turn["tool_call_id"] = m.tool_call_id
        turns.append(turn)
    return turns


def _text(body: dict[str, Any]) -> str:
    content = body["message"]["content"]
    if not isinstance(content, list):
        raise TypeError("message.content is not a list")
    return "".join(str(item["text"]) for item in content if item.get("type") == "text")


def _usage(body: dict[str, Any]) -> dict[str, Any] | None:
    """`usage.billed_units`, else `usage.tokens`; None when neither has token counts."""
    usage = body.get("usage") if isinstance(body, dict) else None
    if not isinstance(usage, dict):
        return None
    for name in ("billed_units", "tokens"):
        figures = usage.get(name)
        if isinstance(figures, dict) and ("input_tokens" in figures
                                          or "output_tokens" in figures):
            return figures
    return None


def _finish_reason(value: object) -> str | None:
    if not isinstance(value, str):
        return None
    return _FINISH_REASONS.get(value.upper(), value.lower())


def _detail(body: Any) -> str:
    if isinstance(body, dict) and isinstance(body.get("message"), str):
        return excerpt(body["message"])
    return excerpt(body) if isinstance(body, str) else ""


def _refined(status: int, detail: str) -> ErrorClass | None:
    """What the error message changes about the status alone, if anything."""
    text = detail.lower()
    if status == 400 and "model" in text and ("not supported" in text or "not ready" in text):
        return ErrorClass("fallback", "unsupported_model", detail)
    if status == 404 and "model" in text:
        return ErrorClass("fallback", "unknown_model", detail)
    if status == 429 and ("/ month" in text or "per month" in text or "monthly" in text):
        return ErrorClass("fallback", "quota_exhausted", detail)
    return None


class CohereChat:
    """POST {base_url}/v2/chat, usage from `usage.billed_units` (else `usage.tokens`)."""

    path = "/v2/chat"

    def build_request(self, model: str, message: AiMessage, api_key: str | None) -> ProviderRequest:
        """A non-streaming Chat v2 request."""
        body: dict[str, Any] = {
            "model": model,
            "messages": _chat_messages(message),
            "max_tokens": message.max_tokens,
        }
        if message.temperature is not None:
            body["temperature"] = message.temperature
        if message.top_p is not None:
            body["p"] = min(max(message.top_p, _P_RANGE[0]), _P_RANGE[1])
        if message.stop is not None:
            body["stop_sequences"] = list(message.stop)
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        return ProviderRequest(path=self.path, json=body, headers=headers)

    def build_stream_request(self, model: str, message: AiMessage, api_key: str | None
                             ) -> ProviderRequest:
        """A streaming Chat v2 request."""
        return self.build_request(model, message, api_key).streaming(stream=True)

    def stream_parser(self) -> CohereStream:
        """A parser of one stream of Chat v2 events."""
        return CohereStream()

    def parse_response(self, body: dict[str, Any]) -> Completion:
        """The text items of `message.content`, usage and the finish reason (in the
        OpenAI words: 'stop', 'length', ...)."""
        try:
            text = _text(body)
            usage = _usage(body)
            return Completion(
                text=text,
                input_tokens=int(usage.get("input_tokens") or 0) if usage else 0,
                output_tokens=int(usage.get("output_tokens") or 0) if usage else 0,
                model=str(body.get("model") or ""),  # Cohere does not echo the model
                finish_reason=_finish_reason(body.get("finish_reason")),
                request_id=body.get("id"),
                usage_known=usage is not None,
            )
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise ValueError(f"malformed Cohere chat response: missing or bad {exc}") from exc

    def classify_error(self, status: int, body: Any, headers: Mapping[str, str]) -> ErrorClass:
        """By Cohere's documented statuses, refined by the message where it says the
        endpoint (its model, its monthly quota) is what is wrong."""
        detail = _detail(body)
        refined = _refined(status, detail)
        if refined is not None:
            return refined
        if status in _BY_STATUS:
            action, reason = _BY_STATUS[status]
            return ErrorClass(action, reason, detail)
        return status_class(status, detail)

    def rate_limits(self, headers: Mapping[str, str]) -> RateLimits:
        """x-trial-endpoint-call-remaining (trial keys only) and Retry-After."""
        return RateLimits(
            requests_remaining=int_header(headers, "x-trial-endpoint-call-remaining"),
            reset_s=retry_after_s(headers, time.time()),
        )


class CohereStream(ParsedStream):
    """The events of one streamed Chat v2 answer (see the module docstring); ended by
    message-end."""

    def feed(self, event: SseEvent) -> str:
        """The text one event adds."""
        data = event.json()
        kind = data.get("type") or event.event
        delta = data.get("delta")
        if kind == "message-start":
            self.state.request_id = data.get("id") or None
        elif kind == "content-delta":
            return self.state.add(_delta_text(delta))
        elif kind == "message-end":
            self._end(delta if isinstance(delta, dict) else {})
        return ""

    def _end(self, delta: dict[str, Any]) -> None:
        self.state.ended = True
        self.state.finish_reason = _finish_reason(delta.get("finish_reason"))
        usage = _usage(delta)
        if usage is not None:
            self.state.usage(int(usage.get("input_tokens") or 0),
                             int(usage.get("output_tokens") or 0))


def _delta_text(delta: Any) -> str:
    try:
        text = delta["message"]["content"].get("text", "")
    except (KeyError, TypeError, AttributeError) as exc:
        raise ValueError(f"malformed stream: content-delta without text ({exc})") from exc
    if not isinstance(text, str):
        raise ValueError("malformed stream: content-delta text is not a string")
    return text
