"""Worker bootsteps: the outbox flusher thread that every worker process runs."""

from __future__ import annotations

from typing import Any

from celery import bootsteps

from aimesh_tasks.outbox import Flusher


class OutboxFlusherStep(bootsteps.StartStopStep):  # type: ignore[misc]
    """Run an outbox Flusher for the life of the worker; flush what is left at shutdown."""

    def __init__(self, parent: Any, **kwargs: Any) -> None:
        super().__init__(parent, **kwargs)
        self.flusher: Flusher | None = None

    def start(self, parent: Any) -> None:
        from aimesh_tasks.settings import get_settings

        self.flusher = Flusher(get_settings().outbox_flush_interval_s)
        self.flusher.start()

    def stop(self, parent: Any) -> None:
        if self.flusher is not None:
            self.flusher.stop()
            self.flusher = None
