"""Background jobs a worker process runs on a timer (outbox flush, budget reaper)."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

logger = logging.getLogger(__name__)


class Periodic:
    """Run `job` every `interval_s` in a daemon thread; once more when stopped."""

    def __init__(self, name: str, interval_s: float, job: Callable[[], Any]) -> None:
        self.name = name
        self.interval_s = interval_s
        self.job = job
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Start running in the background."""
        self._thread = threading.Thread(target=self._loop, name=self.name, daemon=True)
        self._thread.start()

    def _run_once(self) -> None:
        try:
            self.job()
        except Exception:  # Postgres or Redis away: the work stays queued, retried next tick
            logger.exception("%s failed; will retry", self.name)

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._run_once()

    def stop(self) -> None:
        """Stop the thread, then run the job a last time."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        self._run_once()
