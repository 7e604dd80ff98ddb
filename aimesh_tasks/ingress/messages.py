"""GET /v1/aimesh/messages/{id}: a message the ingress queued, polled by its id.

    queued     waiting in a queue: `queue`, `position` (messages ahead of it there),
               `depth`, and `eta_s` from the endpoint's live throughput
    running    taken by a worker (or between two hops): no position
    completed  `result` is the chat.completion
    failed     `error` is the OpenAI-shaped error the synchronous call would have had

`GET /v1/aimesh/messages/{id}/events` streams the same objects as Server-Sent Events, one
per change, ending with the result. Only the agent that sent the message (or an admin
key) may read it; any other caller gets the same 404 as for an unknown id.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool

from aimesh_tasks import keys, queue_position
from aimesh_tasks.errors import NotFound
from aimesh_tasks.ingress.auth import Caller, CallerDep
from aimesh_tasks.ingress.chat import ingress
from aimesh_tasks.ingress.errors import failure_response
from aimesh_tasks.ingress.openai_shapes import completion
from aimesh_tasks.ingress.service import Ingress, enabled_endpoints, owner_of
from aimesh_tasks.registry.live import read_figures
from aimesh_tasks.settings import get_settings

router = APIRouter(tags=["aimesh"])
MAX_ID_LENGTH = 128
EVENTS_INTERVAL_S = 0.5


def where_queued(message_id: str) -> dict[str, Any] | None:
    """The message's queue, position and ETA, or None if it is in no queue (or the broker
    is not Redis: positions are read from the broker's lists)."""
    from aimesh_tasks.observability.exporter import broker_client

    settings = get_settings()
    if not settings.broker_url.startswith(("redis://", "rediss://")):
        return None
    endpoints = enabled_endpoints()
    queues = [keys.ROUTE_QUEUE, *(e.queue for e in endpoints)]
    broker = broker_client(settings.broker_url)
    try:
        found = queue_position.find(broker, queues, message_id)
    finally:
        broker.close()
    if found is None:
        return None
    figures = None
    if found.endpoint_id is not None:
        figures = read_figures([found.endpoint_id])[0].get(found.endpoint_id)
    return {"queue": found.queue, "endpoint_id": found.endpoint_id, "position": found.ahead,
            "depth": found.depth, "eta_s": queue_position.eta_s(found.ahead, figures)}


async def _owner(message_id: str, who: Caller) -> str:
    """The message's agent, when the caller may read it; else NotFound (as if unknown)."""
    unknown = NotFound(f"message '{message_id[:MAX_ID_LENGTH]}' is not known to this ingress "
                       "(or not yours)", kind="message", id=message_id[:MAX_ID_LENGTH])
    if len(message_id) > MAX_ID_LENGTH:
        raise unknown
    owner = await run_in_threadpool(owner_of, message_id)
    if owner is None or (owner not in who.key.agents and not who.admin):
        raise unknown
    return owner


async def describe(runtime: Ingress, message_id: str, owner: str) -> dict[str, Any]:
    """The message's state now: queued (with position and ETA), running, or its end."""
    body: dict[str, Any] = {"id": message_id, "object": "aimesh.message", "agent_id": owner}
    finished = await runtime.waiter.peek(message_id)
    if finished is not None and finished.ok:
        return {**body, "state": "completed", "result": completion(finished.result)}
    if finished is not None:
        failed = failure_response(finished.result)
        return {**body, "state": "failed", "status": failed.status_code,
                **json.loads(bytes(failed.body))}
    queued = await run_in_threadpool(where_queued, message_id)
    if queued is None:
        return {**body, "state": "running"}
    return {**body, "state": "queued", **queued}


@router.get("/v1/aimesh/messages/{message_id}", response_model=None)
async def message_state(message_id: str, request: Request, who: CallerDep) -> JSONResponse:
    """A queued message's state, position and ETA, then its result."""
    owner = await _owner(message_id, who)
    return JSONResponse(await describe(ingress(request), message_id, owner))


async def _changes(runtime: Ingress, message_id: str, owner: str) -> AsyncIterator[bytes]:
    last: dict[str, Any] | None = None
    while True:
        now = await describe(runtime, message_id, owner)
        if now != last:
            yield f"data: {json.dumps(now, separators=(',', ':'))}\n\n".encode()
            last = now
        if now["state"] in ("completed", "failed"):
            return
        # Woken early by the result's publish; otherwise the position is read again.
        await runtime.wait(message_id, EVENTS_INTERVAL_S)


@router.get("/v1/aimesh/messages/{message_id}/events", response_class=StreamingResponse)
async def message_events(message_id: str, request: Request, who: CallerDep
                         ) -> StreamingResponse:
    """The same states as Server-Sent Events, one event per change, until the end."""
    owner = await _owner(message_id, who)
    return StreamingResponse(_changes(ingress(request), message_id, owner),
                             media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache"})
