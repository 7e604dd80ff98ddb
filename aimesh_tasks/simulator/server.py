"""The simulator's aiohttp application: shared state, control endpoints, wire-format routes.

Every wire format is a sibling module exposing ``ROUTES``, a sequence of
``(method, path, handler_factory)``; a factory receives the `SimState` and returns the
aiohttp handler. Adding a provider format means adding its module to `WIRE_FORMATS`.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import random
import secrets
import signal
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Final, Literal

from aiohttp import web
from aiohttp.typedefs import Handler

from aimesh_tasks.simulator import anthropic_format, cohere_format, gemini_format, openai_format
from aimesh_tasks.simulator.config import FAULT_RATES, ConfigFieldError, SimulatorConfig
from aimesh_tasks.simulator.streaming import Holds, client_gone

CALL_KEY_HEADER: Final = "X-Aimesh-Call-Key"
CALL_LOG_SIZE: Final = 100_000
MAX_BODY_BYTES: Final = 64 * 1024 * 1024

Route = tuple[str, str, Callable[["SimState"], Handler]]
WIRE_FORMATS: Final[tuple[Sequence[Route], ...]] = (
    openai_format.ROUTES, anthropic_format.ROUTES, cohere_format.ROUTES,
    gemini_format.ROUTES,
)

_CALL_FIELDS: Final = ("n", "model", "status", "prompt_tokens", "completion_tokens", "call_key",
                       "disconnected")
_STATUS_COUNTERS: Final = {
    200: "ok", 500: "errors_500", 429: "throttled_429", 400: "bad_request_400",
}
_COUNTERS: Final = ("calls", *_STATUS_COUNTERS.values(), "prompt_tokens", "completion_tokens")
# Counted besides, and shown in stats() once they happen: the newer injected faults, calls
# whose caller went away first ("disconnected") and any other status a format answers (the
# wave-1 counters above keep their exact shape).
_EXTRA_COUNTERS: Final = ("overloaded", "malformed", "no_usage")
Fault = Literal["server_error", "throttled", "overloaded", "malformed", "no_usage"]


@dataclass(slots=True)
class Call:
    """One request being answered: its number, caller key, delay and injected fault."""

    n: int
    serial: int
    call_key: str | None
    delay_s: float
    fault: Fault | None  # the injected fault, if any (see SimulatorConfig)
    request: web.BaseRequest


class SimState:
    """Config, counters, call log and fault dice of one simulator; used only on its loop."""

    def __init__(self, config: SimulatorConfig) -> None:
        self.config = config
        self.instance = secrets.token_hex(4)
        self._serials = itertools.count(1)
        self._dice = random.Random(config.seed)
        self._counts = dict.fromkeys(_COUNTERS, 0)
        self._log: deque[tuple[Any, ...]] = deque(maxlen=CALL_LOG_SIZE)
        self.holds = Holds()
        self._waiting = 0
        self._most_waiting = 0
        self._hold = asyncio.Event()  # open once config.hold_in_flight requests wait at once

    def begin(self, request: web.BaseRequest) -> Call:
        """Count a request and roll its latency and injected fault."""
        config = self.config
        self._counts["calls"] += 1
        roll = self._dice.random()
        delay_ms = config.latency_ms
        if config.slow_rate and self._dice.random() < config.slow_rate:
            delay_ms = config.slow_latency_ms
        if config.jitter_ms:
            delay_ms += self._dice.uniform(0.0, config.jitter_ms)
        fault: Fault | None = None
        bound = 0.0
        for rate_name, name in FAULT_RATES.items():
            bound += getattr(config, rate_name)
            if roll < bound:
                fault = name  # type: ignore[assignment]
                break
        key = request.headers.get(CALL_KEY_HEADER)
        return Call(self._counts["calls"], next(self._serials), key, delay_ms / 1000.0, fault,
                    request)

    async def wait(self, call: Call) -> None:
        """Sleep the call's latency without blocking other requests, then wait for the
        hold to open (`SimulatorConfig.hold_in_flight`); counted as waiting meanwhile."""
        self._waiting += 1
        self._most_waiting = max(self._most_waiting, self._waiting)
        try:
            if call.delay_s > 0:
                await asyncio.sleep(call.delay_s)
            hold = self.config.hold_in_flight
            if hold:
                if self._waiting >= hold:
                    self._hold.set()
                await self._hold.wait()
        finally:
            self._waiting -= 1

    def finish(
        self, call: Call, status: int, model: str | None = None,
        prompt_tokens: int = 0, completion_tokens: int = 0,
    ) -> None:
        """Record the outcome of a call in the counters and the call log, `disconnected`
        when the caller went away before it (the call is still answered and billed, as a
        provider bills a request its client abandoned; a stream cut short is billed what
        it wrote: simulator/streaming.py)."""
        counts = self._counts
        disconnected = client_gone(call.request)
        if disconnected:
            counts["disconnected"] = counts.get("disconnected", 0) + 1
        name = _STATUS_COUNTERS.get(status, f"status_{status}")
        counts[name] = counts.get(name, 0) + 1
        if call.fault in _EXTRA_COUNTERS:
            counts[call.fault] = counts.get(call.fault, 0) + 1
        if status == 200:
            counts["prompt_tokens"] += prompt_tokens
            counts["completion_tokens"] += completion_tokens
        self._log.append((call.n, model, status, prompt_tokens, completion_tokens, call.call_key,
                          disconnected))

    def stats(self) -> dict[str, int]:
        """Request and token counters since start or the last reset (counters beyond the
        base set appear once they are non-zero)."""
        return dict(self._counts)

    def in_flight(self) -> dict[str, int]:
        """Requests waiting for their answer now (`in_flight`) and the most that waited at
        once since start or the last reset (`max_in_flight`): how many calls a client held
        open together."""
        return {"in_flight": self._waiting, "max_in_flight": self._most_waiting}

    def calls(self) -> list[dict[str, Any]]:
        """The most recent call records, oldest first: `n`, `model`, `status`, the token
        counts, the caller's `call_key` and `disconnected` (the caller closed its connection
        before the answer was ready: an aborted or hedged-away call)."""
        return [dict(zip(_CALL_FIELDS, record, strict=True)) for record in self._log]

    def reset(self) -> None:
        """Zero counters and log, and reseed the fault dice so a run can be replayed; the
        most in flight starts again from those waiting now, and a hold starts afresh."""
        self._counts = dict.fromkeys(_COUNTERS, 0)
        self._log.clear()
        self._dice = random.Random(self.config.seed)
        self._most_waiting = self._waiting
        self._renew_hold()

    def configure(self, changes: dict[str, Any]) -> dict[str, Any]:
        """Apply runtime config changes (ConfigFieldError if invalid); return the config.
        Setting `hold_in_flight` answers the requests held so far and starts a new hold."""
        self.config = self.config.with_changes(changes)
        if "hold_in_flight" in changes:
            self._renew_hold()
        return self.config.as_dict()

    def _renew_hold(self) -> None:
        """A new, closed hold; whoever waits on the old one is answered, never stranded."""
        self._hold.set()
        self._hold = asyncio.Event()


STATE_KEY: Final = web.AppKey("aimesh_simulator_state", SimState)


def _control_error(message: str, field: str | None) -> web.Response:
    error = {"message": message, "type": "invalid_request_error", "param": field, "code": None}
    return web.json_response({"error": error}, status=400)


def _control_routes(state: SimState) -> list[web.RouteDef]:
    async def health(_: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def stats(_: web.Request) -> web.Response:
        return web.json_response(state.stats())

    async def calls(_: web.Request) -> web.Response:
        return web.json_response(state.calls())

    async def in_flight(_: web.Request) -> web.Response:
        return web.json_response(state.in_flight())

    async def reset(_: web.Request) -> web.Response:
        state.reset()
        return web.json_response(state.stats())

    async def held(_: web.Request) -> web.Response:
        return web.json_response({"held": state.holds.count})

    async def release(_: web.Request) -> web.Response:
        return web.json_response({"released": state.holds.release()})

    async def configure(request: web.Request) -> web.Response:
        try:
            changes = json.loads(await request.read())
        except ValueError:
            return _control_error("Request body is not valid JSON.", None)
        if not isinstance(changes, dict):
            return _control_error("Request body must be a JSON object of config fields.", None)
        try:
            return web.json_response(state.configure(changes))
        except ConfigFieldError as exc:
            return _control_error(str(exc), exc.field)

    return [
        web.get("/health", health),
        web.get("/_sim/stats", stats),
        web.get("/_sim/calls", calls),
        web.get("/_sim/in_flight", in_flight),
        web.post("/_sim/reset", reset),
        web.post("/_sim/config", configure),
        web.get("/_sim/held", held),
        web.post("/_sim/release", release),
    ]


def build_app(config: SimulatorConfig) -> web.Application:
    """The simulator application serving every wire format and the control endpoints."""
    state = SimState(config)
    app = web.Application(client_max_size=MAX_BODY_BYTES)
    app[STATE_KEY] = state
    for routes in WIRE_FORMATS:
        for method, path, factory in routes:
            app.router.add_route(method, path, factory(state))
    app.router.add_routes(_control_routes(state))
    return app


def listening_url(host: str, runner: web.BaseRunner) -> str:
    """The http:// URL of the first socket `runner` listens on, with the real port."""
    port = runner.addresses[0][1]
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


async def _serve_until_signalled(config: SimulatorConfig, host: str, port: int) -> None:
    runner = web.AppRunner(build_app(config), access_log=None, shutdown_timeout=5.0)
    await runner.setup()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    try:
        await web.TCPSite(runner, host, port).start()
        print(f"simulator listening on {listening_url(host, runner)}", flush=True)
        await stop.wait()
    finally:
        await runner.cleanup()


def run_simulator(config: SimulatorConfig, host: str = "127.0.0.1", port: int = 8000) -> None:
    """Serve on host:port until SIGINT or SIGTERM (blocking; call from the main thread)."""
    asyncio.run(_serve_until_signalled(config, host, port))
