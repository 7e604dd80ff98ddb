"""Baseline tasks: a raw Celery two-hop no-op on the spine's own app, broker and backend.

`bench.hop_a` (on queue bench.a) hands the payload to `bench.hop_b` (on queue bench.b)
under its own task id, the same hand-off the spine's route task uses (see
aimesh_tasks/tasks/handoff.py); B's result lands in the same result backend.
`bench.hop_a_replace` does the same with Celery's Task.replace, for comparison.
"""

from __future__ import annotations

import time
from typing import Any

from celery import Task

from aimesh_tasks.app import app
from aimesh_tasks.tasks.handoff import hand_off


@app.task(name="bench.hop_a", bind=True)
def hop_a(self: Task, payload: dict[str, Any]) -> Any:
    """First hop: hand the payload to the second queue."""
    hand_off(self, hop_b.signature((payload,), queue="bench.b"))


@app.task(name="bench.hop_a_replace", bind=True)
def hop_a_replace(self: Task, payload: dict[str, Any]) -> Any:
    """First hop the stock Celery way, Task.replace (for comparison with the hand-off)."""
    raise self.replace(hop_b.signature((payload,), queue="bench.b"))


@app.task(name="bench.hop_b")
def hop_b(payload: dict[str, Any]) -> dict[str, Any]:
    """Second hop: return the payload with the time it finished."""
    return {"published_at": payload["published_at"], "finished_at": time.time()}
