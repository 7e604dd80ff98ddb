"""The one interface every provider adapter implements, and the shapes it returns.

An adapter only translates: an AiMessage into the provider's HTTP request, the provider's
JSON answer into a Completion, a failed answer into an `ErrorClass` (what the path should
do about it), and the provider's rate-limit headers into `RateLimits`. A streamed call is
the same translation in the provider's streaming format: `build_stream_request` asks for
Server-Sent Events, and a `StreamParser` (one per call, pure) turns each event into the
text it adds, ending with the usage and finish reason the provider reported. Transport,
timeouts and connection reuse are shared (providers/http.py), so a new provider is one
file plus one line in the PROVIDERS dict.

What an `ErrorClass.action` means to the message path:

| action     | when                                              | the path                       |
|------------|---------------------------------------------------|--------------------------------|
| `retry`    | a short overload: 429, 503, Anthropic 529,        | same endpoint again, after     |
|            | Gemini RESOURCE_EXHAUSTED                         | `retry_after_s` (resilience)   |
| `fallback` | the endpoint's fault: 5xx, transport error, bad   | next endpoint of the route;    |
|            | key, unknown model, a body we cannot read         | counts against its health      |
| `fail`     | the request's own fault (a 400 about the message) | neither: the message fails     |
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from email.utils import parsedate_to_datetime
from typing import TYPE_CHECKING, Any, Literal, Protocol

from aimesh_tasks.messages import AiMessage

if TYPE_CHECKING:
    from aimesh_tasks.providers.sse import SseEvent

Action = Literal["retry", "fallback", "fail"]
# Bounded excerpt of a provider's error message kept on errors and in the audit.
ERROR_EXCERPT_CHARS = 300


@dataclass(frozen=True, slots=True)
class ProviderRequest:
    """One HTTP request to a provider."""

    path: str
    json: dict[str, Any]
    headers: dict[str, str] = field(default_factory=dict)

    def streaming(self, path: str | None = None, **body: Any) -> ProviderRequest:
        """This request as its streaming form: `body` fields added, on `path` if given
        (the same headers)."""
        return ProviderRequest(path=path or self.path, json={**self.json, **body},
                               headers=self.headers)


@dataclass(frozen=True, slots=True)
class Completion:
    """What a provider answered, with usage from the provider's own usage fields.

    `usage_known` is False when the answer carried no usage: the path then charges the
    call at its reservation (its worst case) and flags the charge, never at zero."""

    text: str
    input_tokens: int
    output_tokens: int
    model: str
    finish_reason: str | None = None
    request_id: str | None = None
    usage_known: bool = True


@dataclass(frozen=True, slots=True)
class ErrorClass:
    """What a failed provider answer means: the action, a short reason word
    ('rate_limited', 'overloaded', 'server_error', 'bad_request', 'auth', ...), a
    bounded excerpt of the provider's own error message, and how long the provider asks
    to wait when it says so in the body (Gemini's RetryInfo); None: see Retry-After."""

    action: Action
    reason: str
    detail: str = ""
    retry_after_s: float | None = None

    @property
    def endpoint_fault(self) -> bool:
        """The failure counts against the endpoint's health (not the message's fault)."""
        return self.action != "fail"


@dataclass(frozen=True, slots=True)
class RateLimits:
    """What a provider's rate-limit headers said; None where a header was absent."""

    requests_remaining: int | None = None
    tokens_remaining: int | None = None
    reset_s: float | None = None


class StreamParser(Protocol):
    """One streamed answer being read, event by event (pure; one instance per call)."""

    @property
    def ended(self) -> bool:
        """The provider's terminal event arrived: the answer is whole."""
        ...

    def feed(self, event: SseEvent) -> str:
        """The text `event` adds to the answer ('' for none). ValueError if the event is
        malformed; `StreamFailed` if it reports an error."""
        ...

    def completion(self) -> Completion:
        """The answer so far, with the provider's usage (`usage_known` False until the
        provider sent it)."""
        ...


class Provider(Protocol):
    """Translate to and from one provider's wire format."""

    def build_request(self, model: str, message: AiMessage, api_key: str | None) -> ProviderRequest:
        """The HTTP request asking `model` to answer `message`."""
        ...

    def build_stream_request(self, model: str, message: AiMessage, api_key: str | None
                             ) -> ProviderRequest:
        """The same request, asking for the answer as Server-Sent Events (with usage)."""
        ...

    def stream_parser(self) -> StreamParser:
        """A parser for one streamed answer of this format."""
        ...

    def parse_response(self, body: dict[str, Any]) -> Completion:
        """The completion in a successful response body; ValueError if it is malformed.
        A body without usage is not malformed: it gives `usage_known=False`."""
        ...

    def classify_error(self, status: int, body: Any, headers: Mapping[str, str]) -> ErrorClass:
        """What a non-200 answer means; `body` is the parsed JSON (None if not JSON);
        `headers` are lower-cased."""
        ...

    def rate_limits(self, headers: Mapping[str, str]) -> RateLimits:
        """The provider's rate-limit headers (lower-cased names) as figures."""
        ...


def excerpt(text: object) -> str:
    """A provider's error text, one line, bounded (never a key: callers pass the body's
    message field, which providers do not fill with credentials)."""
    flat = " ".join(str(text).split())
    if len(flat) > ERROR_EXCERPT_CHARS:
        return flat[: ERROR_EXCERPT_CHARS - 1] + "…"
    return flat


def status_class(status: int, detail: str = "") -> ErrorClass:
    """The classification by HTTP status alone, for statuses a provider does not refine."""
    if status in (429, 503, 529):
        reason = "rate_limited" if status == 429 else "overloaded"
        return ErrorClass("retry", reason, detail)
    if status >= 500 or status == 408:
        return ErrorClass("fallback", "server_error" if status >= 500 else "timeout", detail)
    if status in (401, 403):
        return ErrorClass("fallback", "auth", detail)
    if status == 404:
        return ErrorClass("fallback", "not_found", detail)
    if status in (409, 425):
        return ErrorClass("retry", "conflict", detail)
    return ErrorClass("fail", "bad_request", detail)


def retry_after_s(headers: Mapping[str, str], now_epoch_s: float) -> float | None:
    """`Retry-After` (lower-cased headers) in seconds: delta-seconds or an HTTP date;
    also `retry-after-ms`. None if absent or unreadable; never negative."""
    millis = headers.get("retry-after-ms")
    if millis is not None:
        try:
            return max(float(millis) / 1000.0, 0.0)
        except ValueError:
            pass
    value = headers.get("retry-after")
    if value is None:
        return None
    value = value.strip()
    try:
        return max(float(value), 0.0)
    except ValueError:
        pass
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        return None
    return max(when.timestamp() - now_epoch_s, 0.0)


def int_header(headers: Mapping[str, str], name: str) -> int | None:
    """An integer header, or None if absent or not an integer."""
    value = headers.get(name)
    try:
        return int(value) if value is not None else None
    except ValueError:
        return None


def duration_s(value: str | None) -> float | None:
    """A duration header such as OpenAI's '1s', '6m0s', '20ms', or plain seconds."""
    if value is None:
        return None
    text = value.strip()
    try:
        return float(text)
    except ValueError:
        pass
    total, number = 0.0, ""
    units = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001}
    index = 0
    while index < len(text):
        char = text[index]
        if char.isdigit() or char == ".":
            number += char
            index += 1
            continue
        unit = "ms" if text.startswith("ms", index) else char
        if unit not in units or not number:
            return None
        total += float(number) * units[unit]
        number = ""
        index += len(unit)
    return total if not number else None
