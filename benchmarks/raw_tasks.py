"""Baseline tasks: a raw Celery two-hop no-op on the spine's own app, broker and backend.

`bench.hop_a` (on queue bench.a) hands the payload to `bench.hop_b` (on queue bench.b)
under its own task id, the same hand-off the spine's route task uses (see
aimesh_tasks/tasks/handoff.py); B's result lands in the same result backend.
`bench.hop_a_replace` does the same with Celery's Task.replace, for comparison.
`bench.hop_a_call` hands to `bench.hop_b_call`, whose second hop also makes the spine's
HTTP call to the simulator (one chat completion, with a plain httpx client per thread), so
a comparison with the spine does not charge the spine for the provider round trip.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import httpx
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


@app.task(name="bench.hop_a_call", bind=True)
def hop_a_call(self: Task, payload: dict[str, Any]) -> Any:
    """First hop of the two-hop with a provider call: hand the payload on."""
    hand_off(self, hop_b_call.signature((payload,), queue="bench.b"))


_clients = threading.local()


@app.task(name="bench.hop_b_call")
def hop_b_call(payload: dict[str, Any]) -> dict[str, Any]:
    """Second hop: one chat completion at payload["url"] (the simulator), as the spine's
    endpoint worker makes it, then the payload with the time it finished."""
    client = getattr(_clients, "client", None)
    if client is None:
        client = _clients.client = httpx.Client(timeout=30)
    response = client.post(f"{payload['url']}/v1/chat/completions", json={
        "model": "sim", "max_tokens": 16,
        "messages": [{"role": "user", "content": f"benchmark message {payload['i']}"}]})
    response.raise_for_status()
    return {"published_at": payload["published_at"], "finished_at": time.time(),
            "text": response.json()["choices"][0]["message"]["content"]}
