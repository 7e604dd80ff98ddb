"""Anthropic Messages: POST {base_url}/v1/messages with `x-api-key` and `anthropic-version`.

The Messages API has no system role: system and developer messages go to the top-level
`system` field (a string, or a list of text blocks when there are several). `max_tokens`
is required; `stop` becomes `stop_sequences`. The answer's text is the concatenation of
its `text` content blocks; `stop_reason` is mapped to the OpenAI words the rest of the path
uses (`max_tokens` → "length", so a cut answer is never cached as whole).

Usage: `input_tokens` counts only the uncached part of the prompt, so the input figure is
`input_tokens + cache_creation_input_tokens + cache_read_input_tokens` (all prompt tokens,
priced at the endpoint's one input price).

Errors are `{"type": "error", "error": {"type", "message"}, "request_id"}`; the error
type decides, the status only where the type is unknown or generic:

| status | error.type            | action   | reason                                     |
|--------|-----------------------|----------|--------------------------------------------|
| 400    | invalid_request_error | fail     | bad_request (a spend limit or an empty     |
|        |                       |          | credit balance: fallback, quota_exhausted) |
| 401    | authentication_error  | fallback | auth                                       |
| 402    | billing_error         | fallback | billing                                    |
| 403    | permission_error      | fallback | auth                                       |
| 404    | not_found_error       | fallback | not_found                                  |
| 413    | request_too_large     | fail     | request_too_large                          |
| 429    | rate_limit_error      | retry    | rate_limited (a monthly spend cap, named in |
|        |                       |          | error.details.error_code: fallback)        |
| 500    | api_error             | fallback | server_error                               |
| 504    | timeout_error         | fallback | timeout                                    |
| 529    | overloaded_error      | retry    | overloaded                                 |

Streamed (`"stream": true`), the answer is named events: `message_start` (the message's
id, model and `usage` with the input figures), `content_block_start`, `ping`,
`content_block_delta` (`text_delta` text; other delta types, such as a tool's JSON or
thinking, add no answer text), `content_block_stop`, `message_delta` (the `stop_reason`
and the usage so far: cumulative `output_tokens`, and input figures when it carries them),
`message_stop`. An `event: error` (e.g. `overloaded_error` mid-stream) is an error
reported in the stream, classified by its type like a failed answer.

Rate-limit headers: `anthropic-ratelimit-requests-remaining`,
`anthropic-ratelimit-tokens-remaining` and `anthropic-ratelimit-requests-reset` (an RFC 3339
time); `retry-after` is read by the shared transport (providers/http.py).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from datetime import datetime
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
    status_class,
)
from aimesh_tasks.providers.sse import ParsedStream, SseEvent, StreamFailed

API_VERSION = "2023-06-01"
# Anthropic's temperature range is [0, 1]; ours (OpenAI's) is [0, 2]. A message valid for
# every endpoint of its route must not fail here only for its range: the top of ours is
# the top of theirs.
MAX_TEMPERATURE = 1.0

_SYSTEM_ROLES = frozenset({"system", "developer"})
_STOP_REASONS = {
    "end_turn": "stop",
    "stop_sequence": "stop",
    "max_tokens": "length",
    "tool_use": "tool_calls",
    "refusal": "content_filter",
}
_ERROR_TYPES: dict[str, tuple[Action, str]] = {
    "authentication_error": ("fallback", "auth"),
    "permission_error": ("fallback", "auth"),
    "billing_error": ("fallback", "billing"),
    "not_found_error": ("fallback", "not_found"),
    "api_error": ("fallback", "server_error"),
    "timeout_error": ("fallback", "timeout"),
    "overloaded_error": ("retry", "overloaded"),
    "rate_limit_error": ("retry", "rate_limited"),
    "request_too_large": ("fail", "request_too_large"),
}
# A 429 for a monthly spend cap does not clear by waiting (no retry-after comes with it).
_SPEND_CAP_CODES = frozenset({"enforced_spend_limit_reached", "contract_spend_limit_reached"})
# The API answers a spend limit of the account, or an empty credit balance, with a 400
# invalid_request_error: the endpoint's account is at fault, not the message.
_ACCOUNT_PHRASES = ("spend limit", "credit balance")
_CACHE_FIELDS = ("cache_creation_input_tokens", "cache_read_input_tokens")


def _error_fields(body: Any) -> tuple[str, str, str]:
    """(error.type, error.details.error_code, full message) of an error body."""
    error = body.get("error") if isinstance(body, dict) else None
    if not isinstance(error, dict):
        return "", "", error if isinstance(error, str) else ""
    details = error.get("details")
    code = details.get("error_code") if isinstance(details, dict) else None
    return str(error.get("type") or ""), str(code or ""), str(error.get("message") or "")


def _system_field(texts: list[str]) -> str | list[dict[str, str]]:
    # One block per system message keeps each one's own framing, as OpenAI sends them.
    return texts[0] if len(texts) == 1 else [{"type": "text", "text": t} for t in texts]


def _turns(message: AiMessage) -> tuple[list[str], list[dict[str, str]]]:
    """The system texts, and the user/assistant turns (a tool result is a user turn: the
    Messages API has no tool role, and we carry no tool_use block to answer)."""
    system: list[str] = []
    turns: list[dict[str, str]] = []
    for chat in message.messages:
        if chat.role in _SYSTEM_ROLES:
            system.append(chat.text())
        else:
            role = "assistant" if chat.role == "assistant" else "user"
            turns.append({"role": role, "content": chat.text()})
    return system, turns


def _token_count(usage: dict[str, Any], name: str) -> int:
    value = usage.get(name)
    if value is None:
        return 0
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"malformed message: usage.{name} is {value!r}, not a count")
    return value


def _usage(usage: Any) -> tuple[int, int, bool]:
    """(input tokens with cached ones, output tokens, whether usage was given)."""
    if not isinstance(usage, dict) or "input_tokens" not in usage:
        return 0, 0, False
    prompt = sum(_token_count(usage, name) for name in ("input_tokens", *_CACHE_FIELDS))
    return prompt, _token_count(usage, "output_tokens"), True


def _text(content: Any) -> str:
    if not isinstance(content, list):
        raise ValueError("malformed message: 'content' is not a list of content blocks")
    texts: list[str] = []
    for index, block in enumerate(content):
        if not isinstance(block, dict):
            raise ValueError(f"malformed message: content[{index}] is not an object")
        if block.get("type") == "text":
            text = block.get("text")
            if not isinstance(text, str):
                raise ValueError(f"malformed message: content[{index}].text is not a string")
            texts.append(text)
    return "".join(texts)


def _seconds_until(value: str | None, now_epoch_s: float) -> float | None:
    """Seconds from now to an RFC 3339 time; None if absent, unreadable or zoneless."""
    if value is None:
        return None
    try:
        when = datetime.fromisoformat(value.strip())
    except ValueError:
        return None
    if when.tzinfo is None:
        return None
    return max(when.timestamp() - now_epoch_s, 0.0)


class AnthropicMessages:
    """POST {base_url}/v1/messages; usage from `usage.input_tokens/output_tokens`.

    `clock` (epoch seconds) is what `rate_limits` measures reset times against."""

    path = "/v1/messages"

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock

    def build_request(self, model: str, message: AiMessage, api_key: str | None) -> ProviderRequest:
        """A non-streaming Messages request."""
        system, turns = _turns(message)
        body: dict[str, Any] = {"model": model, "max_tokens": message.max_tokens,
                                "messages": turns}
        if system:
            body["system"] = _system_field(system)
        if message.temperature is not None:
            body["temperature"] = min(message.temperature, MAX_TEMPERATURE)
        if message.top_p is not None:
            body["top_p"] = message.top_p
        if message.stop:
            body["stop_sequences"] = list(message.stop)
        headers = {"anthropic-version": API_VERSION}
        if api_key:
            headers["x-api-key"] = api_key
        return ProviderRequest(path=self.path, json=body, headers=headers)

    def build_stream_request(self, model: str, message: AiMessage, api_key: str | None
                             ) -> ProviderRequest:
        """A streaming Messages request."""
        return self.build_request(model, message, api_key).streaming(stream=True)

    def stream_parser(self) -> AnthropicStream:
        """A parser of one stream of Messages events."""
        return AnthropicStream()

    def parse_response(self, body: dict[str, Any]) -> Completion:
        """The text blocks' text, the provider's usage figures, the stop reason and id."""
        if not isinstance(body, dict):
            raise ValueError("malformed message: the body is not a JSON object")
        text = _text(body.get("content"))
        input_tokens, output_tokens, known = _usage(body.get("usage"))
        stop = body.get("stop_reason")
        message_id = body.get("id")
        return Completion(
            text=text,
            input_tokens=input_tokens,
            output_tokens=output_tokens,
            model=str(body.get("model") or ""),
            finish_reason=_STOP_REASONS.get(stop, stop) if isinstance(stop, str) else None,
            request_id=message_id if isinstance(message_id, str) else None,
            usage_known=known,
        )

    def classify_error(self, status: int, body: Any, headers: Mapping[str, str]) -> ErrorClass:
        """By the error type (see the module table), by status where it says nothing."""
        kind, code, message = _error_fields(body)
        detail = excerpt(message)
        lowered = message.lower()
        if (kind == "rate_limit_error" and code in _SPEND_CAP_CODES) or (
            kind == "invalid_request_error" and any(p in lowered for p in _ACCOUNT_PHRASES)
        ):
            return ErrorClass("fallback", "quota_exhausted", detail)
        known = _ERROR_TYPES.get(kind)
        if known is not None:
            return ErrorClass(known[0], known[1], detail)
        return status_class(status, detail)

    def rate_limits(self, headers: Mapping[str, str]) -> RateLimits:
        """anthropic-ratelimit-requests-remaining/-tokens-remaining, -requests-reset."""
        return RateLimits(
            requests_remaining=int_header(headers, "anthropic-ratelimit-requests-remaining"),
            tokens_remaining=int_header(headers, "anthropic-ratelimit-tokens-remaining"),
            reset_s=_seconds_until(headers.get("anthropic-ratelimit-requests-reset"),
                                   self._clock()),
        )


class AnthropicStream(ParsedStream):
    """The events of one streamed message (see the module docstring); ended by
    message_stop."""

    def __init__(self) -> None:
        super().__init__()
        self._input: tuple[int, bool] = (0, False)

    def feed(self, event: SseEvent) -> str:
        """The text one event adds."""
        data = event.json()
        kind = data.get("type") or event.event
        if kind == "error":
            raise StreamFailed(data)
        if kind == "message_start":
            self._start(data.get("message"))
        elif kind == "content_block_delta":
            return self._delta(data.get("delta"))
        elif kind == "message_delta":
            self._message_delta(data)
        elif kind == "message_stop":
            self.state.ended = True
        return ""

    def _start(self, message: Any) -> None:
        if not isinstance(message, dict):
            raise ValueError("malformed stream: message_start has no message object")
        self.state.model = str(message.get("model") or "")
        message_id = message.get("id")
        self.state.request_id = message_id if isinstance(message_id, str) else None
        prompt, _, known = _usage(message.get("usage"))
        self._input = (prompt, known)

    def _delta(self, delta: Any) -> str:
        if not isinstance(delta, dict):
            raise ValueError("malformed stream: content_block_delta has no delta object")
        if delta.get("type") != "text_delta":
            return ""
        text = delta.get("text")
        if not isinstance(text, str):
            raise ValueError("malformed stream: text_delta.text is not a string")
        return self.state.add(text)

    def _message_delta(self, data: dict[str, Any]) -> None:
        delta = data.get("delta")
        stop = delta.get("stop_reason") if isinstance(delta, dict) else None
        if isinstance(stop, str):
            self.state.finish_reason = _STOP_REASONS.get(stop, stop)
        usage = data.get("usage")
        if not isinstance(usage, dict) or "output_tokens" not in usage:
            return
        output = _token_count(usage, "output_tokens")
        prompt, known = self._input
        if usage.get("input_tokens") is not None:  # newer API versions repeat them here
            prompt, _, known = _usage(usage)
        if known:
            self.state.usage(prompt, output)
