"""Baseline tasks: a raw Celery two-hop no-op on the spine's own app, broker and backend.

`bench.hop_a` (on queue bench.a) replaces itself by `bench.hop_b` (on queue bench.b), the
same mechanism the spine's route task uses; B's result lands in the same result backend.
"""

from __future__ import annotations

import time
from typing import Any

from celery import Task

from aimesh_tasks.app import app


@app.task(name="bench.hop_a", bind=True)
def hop_a(self: Task, payload: dict[str, Any]) -> Any:
    """First hop: hand the payload to the second queue."""
    raise self.replace(hop_b.signature((payload,), queue="bench.b"))


@app.task(name="bench.hop_b")
def hop_b(payload: dict[str, Any]) -> dict[str, Any]:
    """Second hop: return the payload with the time it finished."""
    return {"published_at": payload["published_at"], "finished_at": time.time()}
