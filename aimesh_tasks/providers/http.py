"""The shared upstream call: a per-process pool of single-connection httpx clients.

One httpx client shared by many threads spends its CPU scanning its connection list
under load (encode/httpx#3215; ../shared/MEASURED.md finding 1). Each call here borrows
a client holding one keep-alive connection and gives it back, so a worker process keeps
as many warm connections per endpoint as it runs calls at once, and no more.
"""

from __future__ import annotations

import os
import queue
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import httpx

from aimesh_tasks.errors import ProviderError
from aimesh_tasks.messages import AiMessage, utcnow
from aimesh_tasks.providers import PROVIDERS
from aimesh_tasks.providers.base import Completion, Provider, excerpt, retry_after_s
from aimesh_tasks.providers.credentials import api_key as read_api_key
from aimesh_tasks.providers.credentials import redact
from aimesh_tasks.registry.endpoints import Endpoint
from aimesh_tasks.settings import get_settings

CALL_KEY_HEADER = "X-Aimesh-Call-Key"


class ClientPool:
    """Single-connection httpx clients per base URL, borrowed one per call."""

    def __init__(self) -> None:
        self._pid = os.getpid()
        self._lock = threading.Lock()
        self._idle: dict[str, queue.LifoQueue[httpx.Client]] = {}

    def _idle_for(self, base_url: str) -> queue.LifoQueue[httpx.Client]:
        if self._pid != os.getpid():  # forked: the parent's sockets are not ours to use
            self._pid, self._idle = os.getpid(), {}
        with self._lock:
            return self._idle.setdefault(base_url, queue.LifoQueue())

    def _new_client(self, base_url: str) -> httpx.Client:
        settings = get_settings()
        return httpx.Client(
            base_url=base_url,
            timeout=httpx.Timeout(
                settings.provider_timeout_s, connect=settings.provider_connect_timeout_s
            ),
            limits=httpx.Limits(max_connections=1, max_keepalive_connections=1),
        )

    @contextmanager
    def borrow(self, base_url: str) -> Iterator[httpx.Client]:
        """A client for `base_url`, returned to the pool afterwards (closed if it failed)."""
        idle = self._idle_for(base_url)
        try:
            client = idle.get_nowait()
        except queue.Empty:
            client = self._new_client(base_url)
        try:
            yield client
        except BaseException:
            client.close()
            raise
        idle.put(client)

    def close(self) -> None:
        """Close every idle client."""
        for idle in self._idle.values():
            while not idle.empty():
                idle.get_nowait().close()


CLIENTS = ClientPool()


def _status_error(endpoint: Endpoint, adapter: Provider, response: httpx.Response,
                  api_key: str | None) -> ProviderError:
    """The adapter's reading of a failed answer, as a ProviderError keeping its data and a
    bounded excerpt of the provider's own message (keys and key-like tokens redacted)."""
    status = response.status_code
    try:
        body: Any = response.json()
    except ValueError:
        body = None
    headers = {name.lower(): value for name, value in response.headers.items()}
    verdict = adapter.classify_error(status, body, headers)
    asked_s = retry_after_s(headers, time.time())  # the header, else what the body said
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


def call_timeout(message: AiMessage, now: datetime | None = None) -> httpx.Timeout:
    """The call's timeouts: the configured ones, never longer than the time left before
    the message's deadline (read timeout: the longest wait for the provider's bytes)."""
    settings = get_settings()
    read_s, connect_s = settings.provider_timeout_s, settings.provider_connect_timeout_s
    if message.deadline is not None:
        left_s = max((message.deadline - (now or utcnow())).total_seconds(), 0.001)
        read_s, connect_s = min(read_s, left_s), min(connect_s, left_s)
    return httpx.Timeout(read_s, connect=connect_s)


def _send(endpoint: Endpoint, request_json: dict[str, Any], headers: dict[str, str],
          path: str, timeout: httpx.Timeout) -> httpx.Response:
    try:
        with CLIENTS.borrow(endpoint.base_url) as client:
            return client.post(path, json=request_json, headers=headers, timeout=timeout)
    except httpx.HTTPError as exc:
        # A request that never connected cannot have been billed; one that failed later
        # (read timeout, dropped connection) may have been: the path charges it at the
        # reservation (`maybe_billed`).
        unsent = isinstance(exc, httpx.ConnectError | httpx.ConnectTimeout | httpx.PoolTimeout)
        raise ProviderError(
            f"endpoint '{endpoint.id}': {type(exc).__name__} calling {endpoint.base_url}",
            endpoint_id=endpoint.id,
            action="fallback",
            reason="connect" if unsent else "transport",
            maybe_billed=not unsent,
            retryable=True,
        ) from exc


def call_provider(endpoint: Endpoint, message: AiMessage, call_key: str) -> Completion:
    """Make one upstream call; ProviderError (with `retryable`) on any failure, and
    `key_missing` before any request when the endpoint's key is not on this worker."""
    adapter = PROVIDERS[endpoint.provider]
    api_key = read_api_key(endpoint)
    request = adapter.build_request(endpoint.model, message, api_key)
    response = _send(
        endpoint, request.json, {**request.headers, CALL_KEY_HEADER: call_key}, request.path,
        call_timeout(message),
    )
    if response.status_code != 200:
        raise _status_error(endpoint, adapter, response, api_key)
    try:
        return adapter.parse_response(response.json())
    except ValueError as exc:
        raise ProviderError(
            f"endpoint '{endpoint.id}' sent a response we cannot read: {exc}",
            endpoint_id=endpoint.id,
            status=200,
            action="fallback",
            reason="malformed_response",
            maybe_billed=True,
            retryable=True,
        ) from exc


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
