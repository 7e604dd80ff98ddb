"""GET /v1/aimesh/messages/{id}: a message the ingress queued, polled by its id.

    queued     waiting in a queue: `queue`, `position` (messages ahead of it there),
               `depth`, and `eta_s` from the endpoint's live throughput
    running    taken by a worker (or between two hops): no position
    completed  `result` is the chat.completion
    failed     `error` is the OpenAI-shaped error the synchronous call would have had

Only the agent that sent the message (or an admin key) may read it; any other caller
gets the same 404 as for an unknown id.
"""

from __future__ import annotations

import json
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from aimesh_tasks import keys, queue_position
from aimesh_tasks.errors import NotFound
from aimesh_tasks.ingress.auth import CallerDep
from aimesh_tasks.ingress.chat import ingress
from aimesh_tasks.ingress.errors import failure_response
from aimesh_tasks.ingress.openai_shapes import completion
from aimesh_tasks.ingress.service import enabled_endpoints, owner_of
from aimesh_tasks.registry.live import read_figures
from aimesh_tasks.settings import get_settings

router = APIRouter(tags=["aimesh"])
MAX_ID_LENGTH = 128


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


@router.get("/v1/aimesh/messages/{message_id}", response_model=None)
async def message_state(message_id: str, request: Request,
                        who: CallerDep) -> JSONResponse:
    """A queued message's state, position and ETA, then its result."""
    unknown = NotFound(f"message '{message_id[:MAX_ID_LENGTH]}' is not known to this ingress "
                       "(or not yours)", kind="message", id=message_id[:MAX_ID_LENGTH])
    if len(message_id) > MAX_ID_LENGTH:
        raise unknown
    owner = await run_in_threadpool(owner_of, message_id)
    if owner is None or (owner not in who.key.agents and not who.admin):
        raise unknown
    body: dict[str, Any] = {"id": message_id, "object": "aimesh.message", "agent_id": owner}
    finished = await ingress(request).waiter.peek(message_id)
    if finished is not None and finished.ok:
        return JSONResponse({**body, "state": "completed", "result": completion(finished.result)})
    if finished is not None:
        failed = failure_response(finished.result)
        return JSONResponse({**body, "state": "failed", "status": failed.status_code,
                             **json.loads(bytes(failed.body))})
    queued = await run_in_threadpool(where_queued, message_id)
    if queued is None:
        return JSONResponse({**body, "state": "running"})
    return JSONResponse({**body, "state": "queued", **queued})
