"""A simulator running on its own event loop in a daemon thread, for tests and the demo.

Control methods (`stats`, `calls`, `reset`, `configure`) run on the simulator's loop via
``call_soon_threadsafe``, so the shared state is only ever touched by that loop's thread.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from collections.abc import Callable
from types import TracebackType
from typing import Any, Final, TypeVar

from aiohttp import web

from aimesh_tasks.simulator.config import SimulatorConfig
from aimesh_tasks.simulator.server import STATE_KEY, build_app, listening_url

START_TIMEOUT_S: Final = 10.0
CONTROL_TIMEOUT_S: Final = 30.0
SHUTDOWN_TIMEOUT_S: Final = 2.0

T = TypeVar("T")


class RunningSimulator:
    """A simulator serving in a background thread; stop it with `stop()` or a with-block.

    Constructing one starts it and returns once it listens (`start_simulator` does that).
    """

    def __init__(self, config: SimulatorConfig, host: str = "127.0.0.1", port: int = 0) -> None:
        self.url = ""
        self._app = build_app(config)
        self._state = self._app[STATE_KEY]
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._failure: BaseException | None = None
        self._lock = threading.Lock()
        self._stopped = False
        self._thread = threading.Thread(
            target=self._serve, args=(host, port), name="aimesh-simulator", daemon=True
        )
        self._thread.start()
        if not self._ready.wait(START_TIMEOUT_S):
            self.stop()
            raise TimeoutError(f"simulator did not start listening on {host}:{port}")
        if self._failure is not None:
            self._thread.join()
            self._stopped = True
            raise self._failure

    def _serve(self, host: str, port: int) -> None:
        loop = self._loop
        runner = web.AppRunner(self._app, access_log=None, shutdown_timeout=SHUTDOWN_TIMEOUT_S)
        try:
            loop.run_until_complete(self._listen(runner, host, port))
        except BaseException as exc:  # handed to the starting thread
            self._failure = exc
        self._ready.set()
        try:
            if self._failure is None:
                loop.run_forever()
            loop.run_until_complete(runner.cleanup())
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.run_until_complete(loop.shutdown_default_executor())
        finally:
            loop.close()

    async def _listen(self, runner: web.AppRunner, host: str, port: int) -> None:
        await runner.setup()
        await web.TCPSite(runner, host, port).start()
        self.url = listening_url(host, runner)

    def _on_loop(self, fn: Callable[[], T]) -> T:
        future: concurrent.futures.Future[T] = concurrent.futures.Future()

        def run() -> None:
            try:
                future.set_result(fn())
            except Exception as exc:  # re-raised in the calling thread
                future.set_exception(exc)

        with self._lock:
            if self._stopped:
                raise RuntimeError("the simulator is stopped")
            self._loop.call_soon_threadsafe(run)
        return future.result(CONTROL_TIMEOUT_S)

    def stats(self) -> dict[str, int]:
        """Request and token counters (see `GET /_sim/stats`)."""
        return self._on_loop(self._state.stats)

    def calls(self) -> list[dict[str, Any]]:
        """Per-call records, oldest first (see `GET /_sim/calls`)."""
        return self._on_loop(self._state.calls)

    def in_flight(self) -> dict[str, int]:
        """Requests waiting for their answer now and the most at once (`GET /_sim/in_flight`)."""
        return self._on_loop(self._state.in_flight)

    def reset(self) -> None:
        """Zero the counters and the call log."""
        self._on_loop(self._state.reset)

    def held(self) -> int:
        """How many streams are paused at `hold_after_words` now."""
        return self._on_loop(lambda: self._state.holds.count)

    def release(self) -> int:
        """Let every paused stream go on; how many were paused."""
        return self._on_loop(self._state.holds.release)

    def configure(self, **fields: Any) -> dict[str, Any]:
        """Change runtime config fields (ValueError naming a bad field); return the config."""
        return self._on_loop(lambda: self._state.configure(fields))

    def stop(self) -> None:
        """Stop serving and wait for the thread to end; safe to call more than once."""
        with self._lock:
            if self._stopped:
                return
            self._stopped = True
            self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()

    def __enter__(self) -> RunningSimulator:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"RunningSimulator(url={self.url!r}, stopped={self._stopped})"


def start_simulator(
    config: SimulatorConfig | None = None, host: str = "127.0.0.1", port: int = 0
) -> RunningSimulator:
    """Start a simulator in a daemon thread and return once it listens (port 0: any free)."""
    return RunningSimulator(config if config is not None else SimulatorConfig(), host, port)
