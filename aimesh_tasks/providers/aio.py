"""Upstream HTTP calls on one asyncio event loop per process, for threads that block on them.

A worker thread calls `post()`; the request runs on the process's loop (a daemon thread,
started on first use) and the thread waits on a concurrent future. A call in flight costs a
coroutine and a socket, not a thread of its own on the loop, so one endpoint worker process
holds as many calls as its pool has threads (threads -c1000) at the CPU cost of aiohttp.

    response = post("http://sim:8000/v1", "/chat/completions", body, headers,
                    connect_s=5, read_s=30, cancel=event, on_line=print)

Why aiohttp itself: measured against the simulator at 200 ms latency, 3,000 requests with
1,000 in flight, the client's CPU per call was 0.34 ms for aiohttp, 0.71 ms for httpx on an
aiohttp transport (`httpx-aiohttp`; medians of 3) and 21 ms for one httpx.AsyncClient with
1,000 connections (its pool scans its connection list per request: ../shared/MEASURED.md
finding 1). aiohttp is already a dependency (the simulator).

- **Connections**: one `aiohttp.ClientSession` per base URL, keep-alive, at most
  `AIMESH_PROVIDER_CONNECTIONS_PER_URL` connections; a call finding them all busy waits
  for one, at most its read timeout, then fails as never sent.
- **Where it connects**: only to addresses the upstream URL policy allows
  (registry/url_policy.py, with AIMESH_UPSTREAM_ALLOW_PRIVATE). The base URL's form and
  a literal address in it are checked before the call; a hostname is checked as it
  resolves, by the connector's resolver, so every connection uses an address that passed
  at that moment (a name that resolves elsewhere later, DNS rebinding, is refused then).
  A refusal is `UpstreamURLRefused`, raised before anything is sent. Redirects are never
  followed (aiohttp follows them by default, POST too): a 3xx answer comes back as it is.
- **Timeouts**: `connect_s` bounds the TCP connect; `read_s` bounds each wait for the
  provider's bytes (as httpx's read timeout) and the wait for a free connection.
- **Errors**: `TransportError` for anything below HTTP, `sent` False only when the request
  certainly never left (no connection: refused, connect or pool timeout, bad URL); a
  status is no error: it comes back in `Response`.
- **Cancel**: `cancel` set before the call → `Cancelled(sent=False)`, nothing connects.
  Set while in flight → the request's task is cancelled, its connection closed (never
  returned to the pool, so the provider sees the disconnect) and `Cancelled(sent=True)`
  raised once it is. A `threading.Event` has no callback, and a thread blocked in
  `wait()` per call would outlive every call never cancelled, so one watcher thread per
  process looks at the events of the cancellable calls in flight every `CANCEL_CHECK_S`
  (and sleeps while there are none): a cancel takes effect within about that long.
- **Interrupted caller**: any BaseException raised in the waiting thread (the prefork
  pool's SoftTimeLimitExceeded, an `on_line` that raises) cancels the request the same
  way, and is re-raised at once.
- **on_line**: a 200 answer's body is passed on line by line as it arrives (bytes,
  without the `\\n` or `\\r\\n`; blank lines too: they end server-sent events), and
  `Response.body` is then b"". It is called on the caller's thread, never on the loop, so
  it may block (a Redis XADD) without stalling other calls. Another status keeps its body
  in `Response.body`, for the error to be read.
- **Fork**: the loop, its sessions and the watcher belong to the process that started
  them; a forked child starts its own on first use. The child keeps (and never uses) its
  copies of the parent's sockets, so a connection the parent closes after the fork stays
  open at the provider until the child exits too: fork before making calls, as the prefork
  pool does.
"""

from __future__ import annotations

import asyncio
import atexit
import concurrent.futures
import json as jsonlib
import os
import queue
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Final

import aiohttp
from aiohttp.abc import AbstractResolver, ResolveResult

from aimesh_tasks.registry.url_policy import check_before_resolving, resolve_upstream
from aimesh_tasks.settings import get_settings

CANCEL_CHECK_S: Final = 0.02
START_TIMEOUT_S: Final = 10.0
CLOSE_TIMEOUT_S: Final = 2.0

_JSON: Final = jsonlib.JSONEncoder(ensure_ascii=False, separators=(",", ":"), allow_nan=False)
# Failures with no connection made: the request certainly never reached the provider.
_UNSENT: Final = (aiohttp.ClientConnectorError, aiohttp.ConnectionTimeoutError,
                  aiohttp.InvalidURL, aiohttp.NonHttpUrlClientError)

LineCallback = Callable[[bytes], None]


class Cancelled(Exception):
    """The call was cancelled through its `cancel` event; `sent` says whether the request
    may have reached the provider (it had been handed to the connection)."""

    def __init__(self, *, sent: bool) -> None:
        super().__init__("call cancelled " + ("in flight" if sent else "before it was sent"))
        self.sent = sent


class TransportError(Exception):
    """The call failed below HTTP; `kind` names the failure (aiohttp's exception class),
    `sent` is False only when the request certainly never left."""

    def __init__(self, kind: str, *, sent: bool) -> None:
        super().__init__(f"{kind} ({'after' if sent else 'before'} the request was sent)")
        self.kind = kind
        self.sent = sent


@dataclass(frozen=True, slots=True)
class Response:
    """A provider's answer: status, headers (lower-case names) and the body (b"" when
    `on_line` took it)."""

    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        """The body as JSON (ValueError if it is not)."""
        return jsonlib.loads(self.body)

    @property
    def text(self) -> str:
        """The body as text (undecodable bytes replaced)."""
        return self.body.decode("utf-8", "replace")


class _Call:
    """One call's shared state. `lines` is filled on the loop and drained by the caller;
    `task`, `aborted` and `started` are touched on the loop only (the caller reads
    `started` once the future is done)."""

    __slots__ = ("aborted", "future", "lines", "started", "task")

    def __init__(self, streaming: bool) -> None:
        self.lines: queue.SimpleQueue[list[bytes] | None] | None = (
            queue.SimpleQueue() if streaming else None)
        self.future: concurrent.futures.Future[Response] | None = None
        self.task: asyncio.Task[Any] | None = None
        self.aborted = False
        self.started = False


def _line_batches(buffer: bytes, chunk: bytes) -> tuple[list[bytes], bytes]:
    """The whole lines of `buffer + chunk` (line ends stripped) and the unfinished rest."""
    *whole, rest = (buffer + chunk).split(b"\n")
    return [line[:-1] if line.endswith(b"\r") else line for line in whole], rest


async def _read_lines(response: aiohttp.ClientResponse,
                      lines: queue.SimpleQueue[list[bytes] | None]) -> None:
    buffer = b""
    async for chunk in response.content.iter_any():
        batch, buffer = _line_batches(buffer, chunk)
        if batch:
            lines.put(batch)
    if buffer:
        lines.put([buffer[:-1] if buffer.endswith(b"\r") else buffer])


async def _answer(response: aiohttp.ClientResponse, call: _Call) -> Response:
    headers = {name.lower(): value for name, value in response.headers.items()}
    if call.lines is not None and response.status == 200:
        await _read_lines(response, call.lines)
        body = b""
    else:
        body = await response.read()
    return Response(response.status, headers, body)


class _PolicyResolver(AbstractResolver):
    """aiohttp's resolver, answering a host only when each of its addresses passes the
    upstream URL policy (UpstreamURLRefused otherwise: no connection is made)."""

    def __init__(self, allowed: tuple[str, ...]) -> None:
        self._inner = aiohttp.DefaultResolver()
        self._allowed = list(allowed)

    async def resolve(self, host: str, port: int = 0,
                      family: socket.AddressFamily = socket.AF_INET) -> list[ResolveResult]:
        found = await self._inner.resolve(host, port, family)
        addresses = [str(entry["host"]) for entry in found]
        resolve_upstream(f"http://{host}:{port}", allow_private=self._allowed,
                         resolver=lambda *_: addresses)
        return found

    async def close(self) -> None:
        await self._inner.close()


@lru_cache(maxsize=1024)
def _url_allowed(base_url: str, allowed: tuple[str, ...]) -> None:
    """Check a base URL before calling it: its form, and its address if it is a literal
    one (aiohttp resolves nothing for those); a hostname's addresses are checked as it
    resolves. Raises UpstreamURLRefused."""
    check_before_resolving(base_url, allow_private=list(allowed))


def _allowed_networks() -> tuple[str, ...]:
    return tuple(get_settings().upstream_private_networks)


class _Watcher:
    """Aborts a cancellable call in flight once its event is set (see the module notes)."""

    def __init__(self, abort: Callable[[_Call], None]) -> None:
        self._abort = abort
        self._cond = threading.Condition()
        self._calls: dict[_Call, threading.Event] = {}
        self._thread: threading.Thread | None = None

    def add(self, call: _Call, event: threading.Event) -> None:
        with self._cond:
            self._calls[call] = event
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="aimesh-aio-cancel",
                                                daemon=True)
                self._thread.start()
            self._cond.notify()

    def discard(self, call: _Call) -> None:
        with self._cond:
            self._calls.pop(call, None)

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._calls:
                    self._cond.wait()
                fired = [call for call, event in self._calls.items() if event.is_set()]
                for call in fired:
                    del self._calls[call]
            for call in fired:
                self._abort(call)
            with self._cond:
                self._cond.wait(CANCEL_CHECK_S)


class _Runtime:
    """This process's loop thread, its sessions per base URL and its cancel watcher."""

    def __init__(self) -> None:
        self.pid = os.getpid()
        self.loop = asyncio.new_event_loop()
        self.watcher = _Watcher(self.abort)
        self._sessions: dict[str, aiohttp.ClientSession] = {}  # used on the loop only
        self._limit = get_settings().provider_connections_per_url
        self._resolver: _PolicyResolver | None = None  # made on the loop, on first use
        running = threading.Event()
        self.loop.call_soon(running.set)
        self._thread = threading.Thread(target=self.loop.run_forever, name="aimesh-aio",
                                        daemon=True)
        self._thread.start()
        if not running.wait(START_TIMEOUT_S):
            raise RuntimeError("the provider call loop did not start")

    def submit(self, call: _Call, url: str, base_url: str, body: bytes,
               headers: dict[str, str], timeout: aiohttp.ClientTimeout) -> None:
        coro = self._request(call, url, base_url, body, headers, timeout)
        call.future = asyncio.run_coroutine_threadsafe(coro, self.loop)
        if call.lines is not None:
            lines = call.lines
            call.future.add_done_callback(lambda _: lines.put(None))

    def abort(self, call: _Call) -> None:
        """Cancel `call` from any thread: its task if it runs, else before it starts."""
        self.loop.call_soon_threadsafe(self._abort_on_loop, call)

    @staticmethod
    def _abort_on_loop(call: _Call) -> None:
        call.aborted = True
        if call.task is not None:
            call.task.cancel()

    def _session(self, base_url: str) -> aiohttp.ClientSession:
        session = self._sessions.get(base_url)
        if session is None or session.closed:
            if self._resolver is None:
                self._resolver = _PolicyResolver(_allowed_networks())
            session = self._sessions[base_url] = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=self._limit, limit_per_host=0,
                                               resolver=self._resolver),
                cookie_jar=aiohttp.DummyCookieJar(),  # calls of different agents share it
                timeout=aiohttp.ClientTimeout(),
            )
        return session

    async def _request(self, call: _Call, url: str, base_url: str, body: bytes,
                       headers: dict[str, str], timeout: aiohttp.ClientTimeout) -> Response:
        call.task = asyncio.current_task()
        if call.aborted:
            raise asyncio.CancelledError
        call.started = True
        try:
            response = await self._session(base_url).post(url, data=body, headers=headers,
                                                          timeout=timeout,
                                                          allow_redirects=False)
            try:
                answer = await _answer(response, call)
            except BaseException:
                response.close()  # never back to the pool: the provider sees the disconnect
                raise
        except _UNSENT as exc:
            raise TransportError(type(exc).__name__, sent=False) from exc
        except (TimeoutError, aiohttp.ClientError) as exc:
            raise TransportError(type(exc).__name__, sent=True) from exc
        response.release()
        return answer

    def close(self) -> None:
        """Close the sessions and stop the loop (at exit)."""
        async def close_all() -> None:
            await asyncio.gather(*(s.close() for s in self._sessions.values()))
            if self._resolver is not None:
                await self._resolver.close()

        try:
            asyncio.run_coroutine_threadsafe(close_all(), self.loop).result(CLOSE_TIMEOUT_S)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(CLOSE_TIMEOUT_S)


_LOCK = threading.Lock()
_RUNTIME: _Runtime | None = None
_INHERITED: list[_Runtime] = []  # a parent's, kept so its sessions are never collected here


def _runtime() -> _Runtime:
    global _RUNTIME
    runtime = _RUNTIME
    if runtime is not None and runtime.pid == os.getpid():
        return runtime
    with _LOCK:
        if _RUNTIME is None or _RUNTIME.pid != os.getpid():
            _RUNTIME = _Runtime()
        return _RUNTIME


def _forget_parent() -> None:
    """In a forked child: the parent's loop thread is gone; start afresh on first use."""
    global _LOCK, _RUNTIME
    _LOCK = threading.Lock()  # another thread may have held it at the fork
    if _RUNTIME is not None:
        _INHERITED.append(_RUNTIME)
    _RUNTIME = None


@atexit.register
def _close_at_exit() -> None:
    if _RUNTIME is not None and _RUNTIME.pid == os.getpid():
        _RUNTIME.close()


os.register_at_fork(after_in_child=_forget_parent)


def _joined(base_url: str, path: str) -> str:
    return base_url.rstrip("/") + "/" + path.lstrip("/")


def _deliver(call: _Call, on_line: LineCallback) -> None:
    assert call.lines is not None
    while (batch := call.lines.get()) is not None:
        for line in batch:
            on_line(line)


def post(base_url: str, path: str, json: dict[str, Any], headers: dict[str, str], *,
         connect_s: float, read_s: float, cancel: threading.Event | None = None,
         on_line: LineCallback | None = None) -> Response:
    """POST `json` to `base_url` + `path` on this process's loop and wait for the answer
    (see the module notes for `cancel`, `on_line`, where it may connect and the errors
    raised: UpstreamURLRefused too)."""
    if cancel is not None and cancel.is_set():
        raise Cancelled(sent=False)
    _url_allowed(base_url, _allowed_networks())
    runtime = _runtime()
    call = _Call(streaming=on_line is not None)
    runtime.submit(call, _joined(base_url, path), base_url, _JSON.encode(json).encode(),
                   {"Content-Type": "application/json", **headers},
                   aiohttp.ClientTimeout(total=None, connect=max(read_s, connect_s),
                                         sock_connect=connect_s, sock_read=read_s))
    assert call.future is not None
    if cancel is not None:
        runtime.watcher.add(call, cancel)
    try:
        if on_line is not None:
            _deliver(call, on_line)
        return call.future.result()
    except concurrent.futures.CancelledError:
        raise Cancelled(sent=call.started) from None
    except BaseException:
        if not call.future.done():
            runtime.abort(call)
        raise
    finally:
        if cancel is not None:
            runtime.watcher.discard(call)
