"""POST /v1/chat/completions and GET /v1/models.

A request is turned into an AiMessage for the calling agent and queued with `submit()`.
Synchronous (the default): the answer is awaited, up to the message's deadline or
AIMESH_INGRESS_WAIT_S, then returned as a `chat.completion`. With `stream: true` the
message streams through the queue: the endpoint worker calls the provider with streaming
on and the text is relayed as it arrives, as Server-Sent Events in OpenAI's chunk format,
then the usage chunk when `stream_options.include_usage` (relay.py). A request whose every
candidate endpoint is at capacity is not refused: it waits in the best one's queue, and
its answer carries `X-Aimesh-Queue-Position` (the messages that were ahead of it there).
With `Prefer: respond-async` (or a key created with --respond-async): 202 at once, with a
`Location` to poll (see messages.py). A message that outlives the wait is still queued:
the 504 names its id to poll.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool

from aimesh_tasks.errors import InvalidMessage
from aimesh_tasks.ingress.auth import CallerDep
from aimesh_tasks.ingress.errors import failure_response
from aimesh_tasks.ingress.openai_shapes import ChatCompletionRequest, completion, models_list
from aimesh_tasks.ingress.relay import Relay, still_waiting_error, whole_answer
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
    return failure_response(still_waiting_error(message_id))


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


async def streamed(runtime: Ingress, accepted: Accepted, include_usage: bool,
                   request: Request) -> Response:
    """A streaming message's answer, relayed from its stream as it comes (relay.py)."""
    assert runtime.streams is not None
    following = await runtime.streams.follow(accepted.message_id)
    relay = Relay(runtime.streams, following, runtime.waiter, include_usage,
                  get_settings().ingress_wait_s)
    return await relay.respond(request)


@router.post("/v1/chat/completions", response_model=None,
             responses={202: {"description": "Queued (Prefer: respond-async)"}})
async def chat_completions(body: ChatCompletionRequest, request: Request,
                           who: CallerDep) -> Response:
    """OpenAI's chat completion, on the queue."""
    fields = await message_fields(body, request.headers)
    runtime = ingress(request)
    queued_only = wants_async(request) or who.key.respond_async
    # Relayed as it comes; no Redis: cut from the final text; 202: nobody relays it.
    live = body.stream and runtime.streams is not None and not queued_only
    accepted = await runtime.accept(who.agent_id, {**fields, "stream": live},
                                    api_key=who.api_key)
    if queued_only:
        return accepted_response(accepted)
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    if live:
        return await streamed(runtime, accepted, include_usage, request)
    finished = await runtime.wait(accepted.message_id, get_settings().ingress_wait_s)
    if finished is None:
        return still_waiting(accepted.message_id)
    if not finished.ok:
        return failure_response(finished.result)
    if body.stream:
        return StreamingResponse(whole_answer(finished.result, include_usage),
                                 media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache",
                                          **result_headers(finished.result)})
    return JSONResponse(completion(finished.result), headers=result_headers(finished.result))


@router.get("/v1/models")
async def models(_: CallerDep) -> dict[str, Any]:
    """What `model` may name: 'auto', the enabled endpoints' models and tags."""
    return models_list(await run_in_threadpool(routable_names))
