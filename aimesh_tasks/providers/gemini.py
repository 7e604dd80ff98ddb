"""Google Gemini generateContent (the Gemini Developer API, `generativelanguage.googleapis.com`).

Request: `POST /v1beta/models/{model}:generateContent`, the key in `x-goog-api-key`, chat
turns as `contents[]` of `{role: "user"|"model", parts: [{text}]}`, system and developer
messages in `systemInstruction`, limits in `generationConfig`. Answer: the text parts of
`candidates[0].content`, usage in `usageMetadata` (thinking tokens are billed as output).

Finish reasons are mapped to the words the path already knows, so that a cut answer is
never cached as complete (pipeline/dedup.py looks for "length"):

| Gemini `finishReason`                                        | `Completion.finish_reason` |
|--------------------------------------------------------------|----------------------------|
| STOP                                                         | stop                       |
| MAX_TOKENS                                                   | length                     |
| SAFETY, RECITATION, BLOCKLIST, PROHIBITED_CONTENT, SPII, ... | content_filter             |
| anything else                                                | the name, lower-cased      |

Streamed: `POST /v1beta/models/{model}:streamGenerateContent?alt=sse`; every `data:` line
is a whole GenerateContentResponse holding the next piece of text, the last one with the
`finishReason`; `usageMetadata` comes on the chunks (the figures so far), so the last one
seen is the call's usage. There is no terminal sentinel: the stream ends after the chunk
with the finishReason (or a prompt blocked by `promptFeedback`). An `{"error": ...}`
chunk is an error reported in the stream.

Errors are `{"error": {"code", "message", "status", "details"}}` with a google.rpc status
name; classification goes by that name, then by HTTP status. Gemini sends no rate-limit
headers and no Retry-After: it says how long to wait in a `google.rpc.RetryInfo` detail
(`retryDelay`, a protobuf Duration such as "26s" or "0.5s"), read as the error's
`retry_after_s`.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any
from urllib.parse import quote

from aimesh_tasks.messages import AiMessage
from aimesh_tasks.providers.base import (
    Action,
    Completion,
    ErrorClass,
    ProviderRequest,
    RateLimits,
    excerpt,
    retry_after_s,
    status_class,
)
from aimesh_tasks.providers.sse import ParsedStream, SseEvent, StreamFailed

_ROLES = {"user": "user", "tool": "user", "assistant": "model"}
_SYSTEM_ROLES = frozenset({"system", "developer"})
_GENERATION_CONFIG = (("temperature", "temperature"), ("top_p", "topP"), ("stop", "stopSequences"))
_FILTERED = frozenset({"SAFETY", "RECITATION", "BLOCKLIST", "PROHIBITED_CONTENT", "SPII",
                       "IMAGE_SAFETY"})
_FINISH_WORDS = {"STOP": "stop", "MAX_TOKENS": "length"}
# google.rpc status name -> (action, reason); INVALID_ARGUMENT is refined by `_about_key`.
_STATUS_ACTIONS: dict[str, tuple[Action, str]] = {
    "RESOURCE_EXHAUSTED": ("retry", "rate_limited"),
    "UNAVAILABLE": ("retry", "overloaded"),
    "INTERNAL": ("fallback", "server_error"),
    "UNKNOWN": ("fallback", "server_error"),
    "DEADLINE_EXCEEDED": ("fallback", "timeout"),
    "UNAUTHENTICATED": ("fallback", "auth"),
    "PERMISSION_DENIED": ("fallback", "auth"),
    "NOT_FOUND": ("fallback", "unknown_model"),
    # Free tier not offered in the caller's region, billing not enabled: the endpoint's.
    "FAILED_PRECONDITION": ("fallback", "precondition"),
    "INVALID_ARGUMENT": ("fail", "bad_request"),
}


def finish_word(reason: object) -> str | None:
    """A Gemini finishReason in the path's vocabulary (see the module table)."""
    if not isinstance(reason, str) or not reason:
        return None
    if reason in _FILTERED:
        return "content_filter"
    return _FINISH_WORDS.get(reason, reason.lower())


def _contents(message: AiMessage) -> tuple[list[dict[str, Any]], list[dict[str, str]]]:
    """Chat turns as Gemini contents, and the system/developer texts as instruction parts."""
    contents: list[dict[str, Any]] = []
    system: list[dict[str, str]] = []
    for turn in message.messages:
        text = turn.text()
        if turn.role in _SYSTEM_ROLES:
            system.append({"text": text})
        elif text:  # an empty assistant turn would be refused: parts must not be empty
            contents.append({"role": _ROLES[turn.role], "parts": [{"text": text}]})
    return contents, system


def _error_fields(body: Any) -> tuple[str, str, list[Any]]:
    """(status name, message excerpt, details) of a Gemini error body, blanks if absent."""
    error = body.get("error") if isinstance(body, dict) else None
    if not isinstance(error, dict):
        return "", "", []
    details = error.get("details")
    return (str(error.get("status") or ""), excerpt(error.get("message", "")),
            details if isinstance(details, list) else [])


def _detail_values(details: list[Any], field: str) -> list[str]:
    """Every `field` of the detail objects and of their `violations`, as strings."""
    values: list[str] = []
    for detail in details:
        if not isinstance(detail, dict):
            continue
        nested = detail.get("violations")
        for item in [detail, *(nested if isinstance(nested, list) else [])]:
            if isinstance(item, dict) and item.get(field) is not None:
                values.append(str(item[field]))
    return values


def _about_key(detail: str, details: list[Any]) -> bool:
    """A 400 INVALID_ARGUMENT that is about the API key (the endpoint's), not the message."""
    return ("API_KEY_INVALID" in _detail_values(details, "reason")
            or "api key" in detail.lower())


def retry_delay_s(details: list[Any]) -> float | None:
    """The `retryDelay` of a google.rpc.RetryInfo detail in seconds ("26s", "1.5s"), or
    None if there is none or it cannot be read."""
    for detail in details:
        if not (isinstance(detail, dict) and str(detail.get("@type", "")).endswith(
                "google.rpc.RetryInfo")):
            continue
        delay = detail.get("retryDelay")
        try:
            return max(float(str(delay).strip().removesuffix("s")), 0.0)
        except ValueError:
            return None
    return None


def _daily_quota(details: list[Any]) -> bool:
    """A 429 naming a per-day quota: it resets in hours, so retrying here is pointless."""
    return any("PerDay" in quota for quota in _detail_values(details, "quotaId"))


def _text(body: dict[str, Any]) -> tuple[str, str | None]:
    """The answer text of a response (or chunk) and its finish word, if any."""
    candidates: Any = body.get("candidates")
    feedback = body.get("promptFeedback")
    if not candidates and isinstance(feedback, dict) and feedback.get("blockReason"):
        return "", "content_filter"
    candidate = candidates[0]
    finish_reason = finish_word(candidate.get("finishReason"))
    parts: Any = (candidate.get("content") or {}).get("parts")
    if parts is None and finish_reason is not None:  # e.g. SAFETY, or all thinking
        return "", finish_reason
    # Thought summaries (`thought: true`) are not part of the answer.
    return "".join(p.get("text", "") for p in parts if not p.get("thought")), finish_reason


def _usage(body: dict[str, Any]) -> tuple[int, int] | None:
    """(prompt, output) tokens of `usageMetadata` (thinking billed as output), or None."""
    usage = body.get("usageMetadata")
    if not (isinstance(usage, dict) and "promptTokenCount" in usage):
        return None
    output = int(usage.get("candidatesTokenCount") or 0) + int(
        usage.get("thoughtsTokenCount") or 0)
    return int(usage["promptTokenCount"]), output


class Gemini:
    """POST {base_url}/v1beta/models/{model}:generateContent, key in `x-goog-api-key`."""

    def path(self, model: str) -> str:
        """The generateContent path of `model` ('models/' prefix optional)."""
        return f"/v1beta/models/{quote(model.removeprefix('models/'), safe='')}:generateContent"

    def stream_path(self, model: str) -> str:
        """The streamGenerateContent path of `model`, asking for Server-Sent Events."""
        return self.path(model).replace(":generateContent", ":streamGenerateContent?alt=sse")

    def build_stream_request(self, model: str, message: AiMessage, api_key: str | None
                             ) -> ProviderRequest:
        """A streamGenerateContent request (the same body)."""
        return self.build_request(model, message, api_key).streaming(
            path=self.stream_path(model))

    def stream_parser(self) -> GeminiStream:
        """A parser of one stream of GenerateContentResponse chunks."""
        return GeminiStream()

    def build_request(self, model: str, message: AiMessage, api_key: str | None) -> ProviderRequest:
        """A non-streaming generateContent request."""
        contents, system = _contents(message)
        config: dict[str, Any] = {"maxOutputTokens": message.max_tokens}
        for ours, theirs in _GENERATION_CONFIG:
            value = getattr(message, ours)
            if value is not None:
                config[theirs] = value
        body: dict[str, Any] = {"contents": contents, "generationConfig": config}
        if system:
            body["systemInstruction"] = {"parts": system}
        headers = {"x-goog-api-key": api_key} if api_key else {}
        return ProviderRequest(path=self.path(model), json=body, headers=headers)

    def parse_response(self, body: dict[str, Any]) -> Completion:
        """Text of the first candidate, usage from `usageMetadata`; a prompt blocked by
        safety filters is an empty answer with finish_reason 'content_filter'."""
        try:
            text, finish_reason = _text(body)
            usage = _usage(body)
            return Completion(
                text=text,
                input_tokens=usage[0] if usage else 0,
                output_tokens=usage[1] if usage else 0,
                model=str(body.get("modelVersion", "")),
                finish_reason=finish_reason,
                request_id=body.get("responseId"),
                usage_known=usage is not None,
            )
        except (KeyError, IndexError, TypeError, ValueError, AttributeError) as exc:
            raise ValueError(f"malformed generateContent response: missing or bad {exc}") from exc

    def classify_error(self, status: int, body: Any, headers: Mapping[str, str]) -> ErrorClass:
        """By the google.rpc status name, else the HTTP status: a 400 about the API key and
        a 429 naming a per-day quota are the endpoint's fault (fall back)."""
        name, detail, details = _error_fields(body)
        if name == "INVALID_ARGUMENT" and _about_key(detail, details):
            return ErrorClass("fallback", "auth", detail)
        if name == "RESOURCE_EXHAUSTED" and _daily_quota(details):
            return ErrorClass("fallback", "quota_exhausted", detail)
        if name in _STATUS_ACTIONS:
            action, reason = _STATUS_ACTIONS[name]
            return ErrorClass(action, reason, detail, retry_delay_s(details))
        return status_class(status, detail)

    def rate_limits(self, headers: Mapping[str, str]) -> RateLimits:
        """Gemini documents no rate-limit headers; a Retry-After that a gateway in front of
        it (or the simulator) sends is read as the reset time."""
        return RateLimits(reset_s=retry_after_s(headers, time.time()))


class GeminiStream(ParsedStream):
    """The chunks of one streamGenerateContent answer (see the module docstring)."""

    @property
    def ended(self) -> bool:
        """A chunk with a finish reason arrived (or the prompt was blocked)."""
        return self.state.finish_reason is not None

    def feed(self, event: SseEvent) -> str:
        """The text one chunk adds; its usage figures replace the earlier ones."""
        chunk = event.json()
        if chunk.get("error") is not None:
            raise StreamFailed(chunk)
        state = self.state
        try:
            usage = _usage(chunk)
            text, finish_reason = _text(chunk) if chunk.get("candidates") or chunk.get(
                "promptFeedback") else ("", None)
        except (KeyError, IndexError, TypeError, ValueError, AttributeError) as exc:
            raise ValueError(f"malformed stream chunk: missing or bad {exc}") from exc
        if usage is not None:
            state.usage(*usage)
        state.model = str(chunk.get("modelVersion") or state.model)
        state.request_id = chunk.get("responseId") or state.request_id
        if finish_reason is not None:
            state.finish_reason = finish_reason
        return state.add(text)
