"""POST /v1/batch: a list of chat requests in, a list of results out, in order.

Every request is queued first (each one validated like a single one; a bad one gets its
error in its place and the rest still run), then all are awaited together. Streaming
and `Prefer: respond-async` are for single requests; the OpenAI Batch API is the way to
queue a large batch and come back later.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

from fastapi import APIRouter, Request
from pydantic import BaseModel, Field

from aimesh_tasks.errors import AimeshError, InvalidMessage
from aimesh_tasks.ingress.auth import Caller, CallerDep
from aimesh_tasks.ingress.chat import ingress, message_fields
from aimesh_tasks.ingress.errors import failure_response
from aimesh_tasks.ingress.openai_shapes import ChatCompletionRequest, completion
from aimesh_tasks.ingress.service import Accepted
from aimesh_tasks.outages import TRANSIENT
from aimesh_tasks.settings import get_settings

router = APIRouter(tags=["aimesh"])
MAX_REQUESTS = 100


class BatchRequest(BaseModel):
    """The body of POST /v1/batch."""

    requests: list[ChatCompletionRequest] = Field(min_length=1, max_length=MAX_REQUESTS)


# A bad item, or a server away while it is accepted (503), fails that item, not the batch.
ITEM_ERRORS: tuple[type[BaseException], ...] = (AimeshError, *TRANSIENT)


def _error_item(index: int, error: BaseException) -> dict[str, Any]:
    response = failure_response(error)
    return {"index": index, "status": response.status_code, **json.loads(bytes(response.body))}


async def _queue_one(index: int, item: ChatCompletionRequest, request: Request,
                     who: Caller) -> Accepted | dict[str, Any]:
    try:
        if item.stream:
            raise InvalidMessage(f"requests.{index}.stream: streaming is not available in "
                                 "a batch", field=f"requests.{index}.stream", errors=[])
        fields = await message_fields(item, request.headers)
        return await ingress(request).accept(who.agent_id, fields, api_key=who.api_key)
    except ITEM_ERRORS as exc:
        return _error_item(index, exc)


async def _answer(index: int, queued: Accepted | dict[str, Any], request: Request
                  ) -> dict[str, Any]:
    if isinstance(queued, dict):
        return queued
    finished = await ingress(request).wait(queued.message_id, get_settings().ingress_wait_s)
    if finished is None:
        return {"index": index, "status": 504, "id": queued.message_id,
                "error": {"message": f"no answer yet; poll /v1/aimesh/messages/"
                                     f"{queued.message_id}", "type": "timeout",
                          "param": None, "code": "deadline_exceeded"}}
    if not finished.ok:
        return _error_item(index, finished.result)
    return {"index": index, "status": 200, "response": completion(finished.result)}


@router.post("/v1/batch")
async def batch(body: BatchRequest, request: Request,
                who: CallerDep) -> dict[str, Any]:
    """Run up to 100 chat requests; each result (or error) in its request's place."""
    queued = [await _queue_one(i, item, request, who) for i, item in enumerate(body.requests)]
    answers = await asyncio.gather(*(_answer(i, q, request) for i, q in enumerate(queued)))
    return {"object": "list", "data": list(answers)}
