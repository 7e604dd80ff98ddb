"""POST /v1/chat/completions and GET /v1/models.

A request is turned into an AiMessage for the calling agent and queued with `submit()`.
Synchronous (the default): the answer is awaited, up to the message's deadline or
AIMESH_INGRESS_WAIT_S, then returned as a `chat.completion`, or with `stream: true` as
Server-Sent Events in OpenAI's chunk format (the answer's text in pieces, then the usage
chunk when `stream_options.include_usage`). A request whose every candidate endpoint is at
capacity is not refused: it waits in the best one's queue, and its answer carries
`X-Aimesh-Queue-Position` (the messages that were ahead of it there). With `Prefer:
respond-async` (or a key created with --respond-async): 202 at once, with a `Location` to
poll (see messages.py).
A message that outlives the wait is still queued: the 504 names its id to poll.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Mapping
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool

from aimesh_tasks.errors import DeadlineExceeded, InvalidMessage
from aimesh_tasks.ingress.auth import CallerDep
from aimesh_tasks.ingress.errors import failure_response
from aimesh_tasks.ingress.openai_shapes import (
    ChatCompletionRequest,
    chunks,
    completion,
    models_list,
)
from aimesh_tasks.ingress.service import (
    Accepted,
    Ingress,
    header_fields,
    model_hint,
    routable_names,
)
from aimesh_tasks.settings import get_settings

router = APIRouter(tags=["openai"])
RESPOND_ASYNC = "respond-async"
QUEUE_POSITION_HEADER = "X-Aimesh-Queue-Position"


def ingress(request: Request) -> Ingress:
    """The app's shared Ingress (built at start-up)."""
    runtime: Ingress = request.app.state.ingress
    return runtime


def wants_async(request: Request) -> bool:
    """`Prefer: respond-async` (RFC 7240) was asked."""
    prefer = request.headers.get("prefer", "")
    return any(p.strip().split("=")[0].lower() == RESPOND_ASYNC for p in prefer.split(","))


async def message_fields(body: ChatCompletionRequest, headers: Mapping[str, str]
                         ) -> dict[str, Any]:
    """The AiMessage fields of a chat request: body, model hint and headers."""
    unsupported = body.unsupported_field()
    if unsupported is not None:
        raise InvalidMessage(f"{unsupported}: not supported by this ingress (plain chat "
                             "completions only)", field=unsupported, errors=[])
    hint = await run_in_threadpool(model_hint, body.model)
    return {**body.message_fields(), **hint, **header_fields(headers)}


def accepted_response(accepted: Accepted) -> JSONResponse:
    """202 with the message id and where to poll it."""
    location = f"/v1/aimesh/messages/{accepted.message_id}"
    return JSONResponse(
        {"id": accepted.message_id, "object": "aimesh.message", "state": "queued",
         "location": location},
        status_code=202, headers={"Location": location, "Preference-Applied": RESPOND_ASYNC})


def still_waiting(message_id: str) -> JSONResponse:
    """504: the answer did not come in time; the message is still queued."""
    error = DeadlineExceeded(
        f"no answer within the ingress's wait (AIMESH_INGRESS_WAIT_S); message "
        f"{message_id} is still queued: GET /v1/aimesh/messages/{message_id}",
        message_id=message_id)
    return failure_response(error)


def result_headers(result: dict[str, Any]) -> dict[str, str]:
    """What the message path tells a synchronous caller in headers: the message id, the
    endpoint, how long the message waited in the queue, and, when it was queued behind an
    endpoint at capacity (every candidate was), how many messages were ahead of it."""
    headers = {"X-Aimesh-Message-Id": str(result.get("message_id", "")),
               "X-Aimesh-Endpoint": str(result.get("endpoint_id", "")),
               "X-Aimesh-Queue-Wait-Ms": f"{float(result.get('queue_wait_ms') or 0):.1f}"}
    if result.get("queue_position") is not None:
        headers[QUEUE_POSITION_HEADER] = str(int(result["queue_position"]))
    return headers


def _sse(chunk: dict[str, Any] | str) -> bytes:
    data = chunk if isinstance(chunk, str) else json.dumps(chunk, separators=(",", ":"))
    return f"data: {data}\n\n".encode()


async def _stream(result: dict[str, Any], include_usage: bool) -> AsyncIterator[bytes]:
    for chunk in chunks(result, include_usage):
        yield _sse(chunk)
    yield _sse("[DONE]")


@router.post("/v1/chat/completions", response_model=None,
             responses={202: {"description": "Queued (Prefer: respond-async)"}})
async def chat_completions(body: ChatCompletionRequest, request: Request,
                           who: CallerDep) -> Response:
    """OpenAI's chat completion, on the queue."""
    fields = await message_fields(body, request.headers)
    runtime = ingress(request)
    accepted = await runtime.accept(who.agent_id, fields, api_key=who.api_key)
    if wants_async(request) or who.key.respond_async:
        return accepted_response(accepted)
    finished = await runtime.wait(accepted.message_id, get_settings().ingress_wait_s)
    if finished is None:
        return still_waiting(accepted.message_id)
    if not finished.ok:
        return failure_response(finished.result)
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return StreamingResponse(_stream(finished.result, include_usage),
                                 media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache",
                                          **result_headers(finished.result)})
    return JSONResponse(completion(finished.result), headers=result_headers(finished.result))


@router.get("/v1/models")
async def models(_: CallerDep) -> dict[str, Any]:
    """What `model` may name: 'auto', the enabled endpoints' models and tags."""
    return models_list(await run_in_threadpool(routable_names))
