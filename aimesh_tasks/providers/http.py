"""The shared upstream call: one provider request on this process's event loop.

The request itself runs in `providers.aio` (one asyncio loop per process, aiohttp, a
bounded keep-alive pool per base URL); this module builds it from the endpoint's adapter,
caps its timeouts at the message's deadline, and reads the answer or the failure into a
Completion or a ProviderError the path can act on (`action`, `maybe_billed`).
`stream_provider` makes the same call with streaming on, in the provider's own format,
handing each text delta on as it arrives.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from aimesh_tasks.errors import ProviderError
from aimesh_tasks.messages import AiMessage, utcnow
from aimesh_tasks.providers import PROVIDERS, aio
from aimesh_tasks.providers.base import (
    Completion,
    Provider,
    ProviderRequest,
    StreamParser,
    excerpt,
    retry_after_s,
)
from aimesh_tasks.providers.credentials import api_key as read_api_key
from aimesh_tasks.providers.credentials import redact
from aimesh_tasks.providers.sse import IN_STREAM_ERROR_STATUS, SseDecoder, SseEvent, StreamFailed
from aimesh_tasks.registry.endpoints import Endpoint
from aimesh_tasks.registry.url_policy import UpstreamURLRefused, shown_url
from aimesh_tasks.settings import get_settings

CALL_KEY_HEADER = "X-Aimesh-Call-Key"


def _status_error(endpoint: Endpoint, adapter: Provider, response: aio.Response,
                  api_key: str | None) -> ProviderError:
    """The adapter's reading of a failed answer, as a ProviderError keeping its data and a
    bounded excerpt of the provider's own message (keys and key-like tokens redacted); a
    redirect is the path's own error (never followed)."""
    status = response.status
    if 300 <= status < 400:
        return _redirect_error(endpoint, response)
    try:
        body: Any = response.json()
    except ValueError:
        body = None
    verdict = adapter.classify_error(status, body, response.headers)
    asked_s = retry_after_s(response.headers, time.time())  # the header, else the body's
    detail = redact(verdict.detail or (excerpt(response.text) if body is None else ""),
                    api_key)
    return ProviderError(
        f"endpoint '{endpoint.id}' answered HTTP {status} ({verdict.reason})"
        + (f": {detail}" if detail else ""),
        endpoint_id=endpoint.id,
        status=status,
        action=verdict.action,
        reason=verdict.reason,
        detail=detail or None,
        retryable=verdict.action != "fail",
        retry_after_s=asked_s if asked_s is not None else verdict.retry_after_s,
    )


def _redirect_error(endpoint: Endpoint, response: aio.Response) -> ProviderError:
    """A redirect is never followed: the URL it names did not pass the upstream URL
    policy. The endpoint's fault (fall back), with where it pointed (shown safely)."""
    location = response.headers.get("location")
    where = f" to {shown_url(location)!r}" if location else ""
    return ProviderError(
        f"endpoint '{endpoint.id}' answered HTTP {response.status}, a redirect{where}; "
        "redirects are never followed (only the endpoint's own URL passed the upstream URL "
        "policy). Fix: give the endpoint the final URL (`aimesh endpoints update "
        f"{endpoint.id} --url ...`)",
        endpoint_id=endpoint.id, status=response.status, action="fallback",
        reason="redirect", retryable=True)


@dataclass(frozen=True, slots=True)
class CallTimeout:
    """One call's timeouts: the TCP connect, and each wait for the provider's bytes."""

    connect_s: float
    read_s: float


def call_timeout(message: AiMessage, now: datetime | None = None) -> CallTimeout:
    """The call's timeouts: the configured ones, never longer than the time left before
    the message's deadline (read timeout: the longest wait for the provider's bytes)."""
    settings = get_settings()
    read_s, connect_s = settings.provider_timeout_s, settings.provider_connect_timeout_s
    if message.deadline is not None:
        left_s = max((message.deadline - (now or utcnow())).total_seconds(), 0.001)
        read_s, connect_s = min(read_s, left_s), min(connect_s, left_s)
    return CallTimeout(connect_s=connect_s, read_s=read_s)


def _send(endpoint: Endpoint, request: ProviderRequest, headers: dict[str, str],
          timeout: CallTimeout, cancel: threading.Event | None,
          on_line: aio.LineCallback | None = None) -> aio.Response:
    try:
        return aio.post(endpoint.base_url, request.path, request.json, headers,
                        connect_s=timeout.connect_s, read_s=timeout.read_s, cancel=cancel,
                        on_line=on_line)
    except aio.TransportError as exc:
        # A request that never connected cannot have been billed; one that failed later
        # (read timeout, dropped connection) may have been: the path charges it at the
        # reservation (`maybe_billed`).
        raise ProviderError(
            f"endpoint '{endpoint.id}': {exc.kind} calling {endpoint.base_url}",
            endpoint_id=endpoint.id,
            action="fallback",
            reason="transport" if exc.sent else "connect",
            maybe_billed=exc.sent,
            retryable=True,
        ) from exc
    except UpstreamURLRefused as exc:
        raise ProviderError(
            f"endpoint '{endpoint.id}' was not called: {exc.message} (upstream URL "
            "policy, AIMESH_UPSTREAM_ALLOW_PRIVATE)",
            endpoint_id=endpoint.id,
            action="fallback",
            reason="upstream_refused",
            detail=exc.reason,
            retryable=True,
            called=False,
        ) from exc
    except aio.Cancelled as exc:
        raise ProviderError(
            f"endpoint '{endpoint.id}': the call was {exc}",
            endpoint_id=endpoint.id,
            action="fail",
            reason="cancelled",
            maybe_billed=exc.sent,
            retryable=False,
        ) from exc


def call_provider(endpoint: Endpoint, message: AiMessage, call_key: str, *,
                  cancel: threading.Event | None = None) -> Completion:
    """Make one upstream call; ProviderError (with `retryable`) on any failure, and
    `key_missing` before any request when the endpoint's key is not on this worker.
    `cancel` set aborts it (before sending, or closing the connection in flight):
    ProviderError reason `cancelled`, `maybe_billed` when it had been sent."""
    adapter = PROVIDERS[endpoint.provider]
    api_key = read_api_key(endpoint)
    request = adapter.build_request(endpoint.model, message, api_key)
    response = _send(endpoint, request, {**request.headers, CALL_KEY_HEADER: call_key},
                     call_timeout(message), cancel)
    if response.status != 200:
        raise _status_error(endpoint, adapter, response, api_key)
    try:
        return adapter.parse_response(response.json())
    except ValueError as exc:
        raise _unreadable(endpoint, exc) from exc


def _unreadable(endpoint: Endpoint, exc: ValueError) -> ProviderError:
    """A 200 answer we cannot read: billed, we cannot know how much (the reservation)."""
    return ProviderError(
        f"endpoint '{endpoint.id}' sent a response we cannot read: {exc}",
        endpoint_id=endpoint.id,
        status=200,
        action="fallback",
        reason="malformed_response",
        maybe_billed=True,
        retryable=True,
    )


class _Reading:
    """A streamed answer read line by line (on the caller's thread): SSE events into the
    adapter's parser, its text deltas to `deltas`."""

    def __init__(self, parser: StreamParser, deltas: Callable[[str], None]) -> None:
        self.parser = parser
        self._decoder = SseDecoder()
        self._deltas = deltas

    def line(self, raw: bytes) -> None:
        """One line of the body (a parser error raised here aborts the request)."""
        event = self._decoder.feed(raw)
        if event is not None:
            self._event(event)

    def close(self) -> None:
        """The body ended: an event left without its blank line."""
        event = self._decoder.close()
        if event is not None:
            self._event(event)

    def _event(self, event: SseEvent) -> None:
        text = self.parser.feed(event)
        if text:
            self._deltas(text)


def stream_provider(endpoint: Endpoint, message: AiMessage, call_key: str,
                    deltas: Callable[[str], None], *,
                    cancel: threading.Event | None = None) -> Completion:
    """Make one upstream call with streaming on: each text delta goes to `deltas` as the
    provider sends it, and the completion carries the usage the stream ended with.

    Failures are those of `call_provider`, plus: an error reported inside the stream
    (classified by the adapter like a failed answer), an unreadable event or a stream that
    ends before its final event (`malformed_response`), each billed (`maybe_billed`).
    A cancel keeps the usage the provider reported before it (`reported_usage`)."""
    adapter = PROVIDERS[endpoint.provider]
    api_key = read_api_key(endpoint)
    request = adapter.build_stream_request(endpoint.model, message, api_key)
    reading = _Reading(adapter.stream_parser(), deltas)
    try:
        response = _send(endpoint, request, {**request.headers, CALL_KEY_HEADER: call_key},
                         call_timeout(message), cancel, on_line=reading.line)
        if response.status != 200:
            raise _status_error(endpoint, adapter, response, api_key)
        reading.close()
    except StreamFailed as exc:
        raise _failed_in_stream(endpoint, adapter, exc.body, api_key) from exc
    except ValueError as exc:
        raise _unreadable(endpoint, exc) from exc
    except ProviderError as exc:
        done = reading.parser.completion()
        if exc.fields.get("reason") == "cancelled" and done.usage_known:
            exc.fields["reported_usage"] = {"input_tokens": done.input_tokens,
                                            "output_tokens": done.output_tokens}
        raise
    if not reading.parser.ended:
        raise _unreadable(endpoint, ValueError("the stream ended before its final event"))
    return reading.parser.completion()


def _failed_in_stream(endpoint: Endpoint, adapter: Provider, body: Any,
                      api_key: str | None) -> ProviderError:
    verdict = adapter.classify_error(IN_STREAM_ERROR_STATUS, body, {})
    detail = redact(verdict.detail, api_key)
    return ProviderError(
        f"endpoint '{endpoint.id}' reported an error in its stream ({verdict.reason})"
        + (f": {detail}" if detail else ""),
        endpoint_id=endpoint.id, status=200, action=verdict.action, reason=verdict.reason,
        detail=detail or None, retryable=verdict.action != "fail", maybe_billed=True,
        retry_after_s=verdict.retry_after_s)


@dataclass(frozen=True, slots=True)
class Probe:
    """One test call's outcome (`aimesh endpoints test`): the answer or the error."""

    latency_ms: float
    completion: Completion | None
    error: ProviderError | None

    @property
    def ok(self) -> bool:
        """The endpoint answered."""
        return self.error is None


def probe(endpoint: Endpoint, message: AiMessage) -> Probe:
    """One call to `endpoint` from this process (its environment's key), timed; nothing
    is charged, journalled or audited."""
    started = time.perf_counter()
    try:
        completion: Completion | None = call_provider(endpoint, message,
                                                      f"probe:{message.id}")
        error = None
    except ProviderError as exc:
        completion, error = None, exc
    return Probe(round((time.perf_counter() - started) * 1000, 3), completion, error)
