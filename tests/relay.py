"""An HTTP relay in front of a simulated provider, for tests that need to see when calls
arrive or to let them through one at a time.

Register an endpoint at `relay.url`. Every request is forwarded to the simulator; the
relay stamps when it arrived and when its answer left (epoch seconds, `time.time()`,
the clock the workers use too), and can:
- hold every answer until `release()` lets one through (`hold=True`), so a test moves a
  worker one call at a time instead of racing it;
- rewrite the simulator's `Retry-After: N` as an HTTP date N seconds after the next
  whole second (`retry_after_as_date=True`; `dates` keeps what it sent);
- run `on_answer(n, status)` after the simulator answered call n, before the caller sees
  it (e.g. reconfigure the simulator so that the retry is answered differently).
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from email.utils import formatdate
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx

from tests.waits import wait_until

CALL_KEY_HEADER = "x-aimesh-call-key"
_HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "content-length", "date",
               "server"}


@dataclass
class Arrival:
    """One request through the relay."""

    n: int
    call_key: str | None
    arrived_at: float
    status: int | None = None
    answered_at: float | None = None
    retry_after: str | None = None


class Relay:
    """A threaded HTTP relay to one upstream URL (see the module docstring)."""

    def __init__(self, upstream_url: str, *, hold: bool = False,
                 retry_after_as_date: bool = False,
                 on_answer: Callable[[int, int], Any] | None = None) -> None:
        self._upstream = httpx.Client(base_url=upstream_url, timeout=120)
        self._lock = threading.Lock()
        self._arrivals: list[Arrival] = []
        self._gate = threading.Semaphore(0)
        self.hold = hold
        self.retry_after_as_date = retry_after_as_date
        self.on_answer = on_answer
        self.dates: list[float] = []  # the epoch second of every HTTP date sent
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        threading.Thread(target=self._server.serve_forever, name="test-relay",
                         daemon=True).start()

    def arrivals(self) -> list[Arrival]:
        """Every request so far, in arrival order."""
        with self._lock:
            return list(self._arrivals)

    def wait_arrivals(self, count: int, timeout_s: float = 60) -> list[Arrival]:
        """Wait until `count` requests have arrived; fail naming what arrived."""
        return wait_until(lambda: self.arrivals() if len(self.arrivals()) >= count else None,
                          f"{count} request(s) at the relay", timeout_s,
                          seen=lambda: [(a.n, a.call_key) for a in self.arrivals()])

    def release(self, count: int = 1) -> None:
        """Let `count` held answers through (in the order they are waiting)."""
        for _ in range(count):
            self._gate.release()

    def release_all(self) -> None:
        """Stop holding: every held and later answer goes through."""
        self.hold = False
        self.release(1000)

    def close(self) -> None:
        self.release_all()
        self._server.shutdown()
        self._server.server_close()
        self._upstream.close()

    def _answer(self, path: str, body: bytes, headers: dict[str, str]
                ) -> tuple[Arrival, httpx.Response, dict[str, str]]:
        with self._lock:
            arrival = Arrival(len(self._arrivals) + 1, headers.get(CALL_KEY_HEADER), time.time())
            self._arrivals.append(arrival)
        response = self._upstream.post(path, content=body, headers=headers)
        out = {k: v for k, v in response.headers.items() if k.lower() not in _HOP_BY_HOP}
        if self.retry_after_as_date and "retry-after" in response.headers:
            when = math.ceil(time.time()) + float(response.headers["retry-after"])
            out = {k: v for k, v in out.items() if k.lower() != "retry-after"}
            out["Retry-After"] = formatdate(when, usegmt=True)
            self.dates.append(when)
        if self.on_answer is not None:
            self.on_answer(arrival.n, response.status_code)
        arrival.status, arrival.retry_after = response.status_code, out.get(
            "Retry-After", out.get("retry-after"))
        if self.hold:
            self._gate.acquire()
        return arrival, response, out

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        relay = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("content-length") or 0))
                headers = {k.lower(): v for k, v in self.headers.items()
                           if k.lower() not in _HOP_BY_HOP and k.lower() != "host"}
                arrival, response, out = relay._answer(self.path, body, headers)
                self.send_response(response.status_code)
                for name, value in out.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(response.content)))
                self.end_headers()
                arrival.answered_at = time.time()
                self.wfile.write(response.content)

        return Handler
