"""Embedded mode: one process, no servers.

Celery's in-memory broker with a worker thread in this process (threads pool), a SQLite
file database (migrated on first use, see db/engine.py), and an in-process Redis for the
live figures. Used when AIMESH_BROKER_URL is memory:// (the default). The worker follows
the endpoint registry (aimesh_tasks.follow), so endpoints added later are served too.
"""

from __future__ import annotations

import atexit
import threading
from contextlib import AbstractContextManager
from typing import Any

from celery.contrib.testing.worker import start_worker

from aimesh_tasks.app import app
from aimesh_tasks.follow import FOLLOW_SETTING
from aimesh_tasks.keys import ROUTE_QUEUE
from aimesh_tasks.settings import get_settings

_lock = threading.Lock()
_running: list[AbstractContextManager[Any]] = []


def ensure_embedded_worker() -> None:
    """In embedded mode, start the in-process worker, once."""
    if not get_settings().embedded:
        return
    with _lock:
        if _running:
            return
        app.conf[FOLLOW_SETTING] = True
        context: AbstractContextManager[Any] = start_worker(
            app,
            pool="threads",
            concurrency=get_settings().embedded_concurrency,
            perform_ping_check=False,
            queues=[ROUTE_QUEUE],
            loglevel="WARNING",
            shutdown_timeout=30,
        )
        context.__enter__()
        _running.append(context)
    atexit.register(stop_embedded_worker)


def stop_embedded_worker() -> None:
    """Stop the in-process worker if it runs."""
    with _lock:
        context = _running.pop() if _running else None
    if context is not None:
        context.__exit__(None, None, None)
