"""Drives the stored batches: queue their lines, collect the answers, write the files.

Every ingress process runs one driver loop (started with the app). Each tick it lists
the batches still to drive and, for each one whose Redis lease it holds (one process per
batch at a time, the lease expiring if that process dies), does one step: queue up to
STEP_LINES pending lines through `submit()` (each with its fixed message id), record the
answers of queued lines that finished, and once no line is pending or queued, write the
output and error files. Everything a step learns is in the database before the next
step, so a restart, or another process taking the lease over, goes on where it stopped.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import uuid
from typing import Any

from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool

from aimesh_tasks import keys
from aimesh_tasks.batches import store
from aimesh_tasks.errors import AimeshError, InvalidMessage, ServiceUnavailable
from aimesh_tasks.ingress.errors import aimesh_error_response, failure_response
from aimesh_tasks.ingress.openai_shapes import ChatCompletionRequest, completion
from aimesh_tasks.ingress.service import Ingress, header_fields, model_hint
from aimesh_tasks.redis_client import get_redis
from aimesh_tasks.results import Finished

logger = logging.getLogger(__name__)
STEP_LINES = 200
LEASE_S = 15
TICK_S = 0.5
Outcome = tuple[int, str, int | None, dict[str, Any] | None]


def _response_of(error: BaseException) -> tuple[int, dict[str, Any]]:
    response = (aimesh_error_response(error) if isinstance(error, AimeshError)
                else failure_response(error))
    return response.status_code, json.loads(bytes(response.body))


def _fields(body: dict[str, Any]) -> dict[str, Any]:
    try:
        request = ChatCompletionRequest.model_validate(body)
    except ValidationError as exc:
        first = exc.errors()[0]
        field = ".".join(str(p) for p in first["loc"]) or "body"
        raise InvalidMessage(f"{field}: {first['msg']}", field=field, errors=[]) from None
    unsupported = request.unsupported_field()
    if unsupported is not None or request.stream:
        name = unsupported or "stream"
        raise InvalidMessage(f"{name}: not supported in a batch", field=name, errors=[])
    return {**request.message_fields(), **model_hint(request.model), **header_fields({})}


def _lease(batch_id: str, token: str) -> bool:
    """Take or keep the batch's driver lease."""
    client = get_redis()
    name = keys.ingress_batch_driver(batch_id)
    if client.set(name, token, nx=True, ex=LEASE_S):
        return True
    if client.get(name) == token:
        client.expire(name, LEASE_S)
        return True
    return False


class BatchDriver:
    """The loop that drives batches from this process."""

    def __init__(self, runtime: Ingress) -> None:
        self.runtime = runtime
        self.token = uuid.uuid4().hex
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="aimesh-batch-driver")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _run(self) -> None:
        while True:
            try:
                await self.tick()
            except Exception:  # the loop must outlive an outage; the next tick retries
                logger.exception("ingress.batch_driver_failed")
            await asyncio.sleep(TICK_S)

    async def tick(self) -> None:
        """One step of every batch this process holds the lease of."""
        for batch in await run_in_threadpool(store.active_batches):
            if await run_in_threadpool(_lease, batch.id, self.token):
                await self.step(batch)

    async def step(self, batch: store.ActiveBatch) -> None:
        """Queue some pending lines (or cancel them), record finished ones, finalize."""
        batch_id = batch.id
        if batch.status == "cancelling":
            await run_in_threadpool(store.cancel_pending, batch_id)
        pending = await run_in_threadpool(store.lines_in, batch_id, "pending", STEP_LINES)
        queued_now = [await self._queue(batch, line.line_no, line.body) for line in pending]
        outcomes = [outcome for outcome in queued_now if outcome is not None]
        queued = await run_in_threadpool(store.lines_in, batch_id, "queued", STEP_LINES * 5)
        finished = await asyncio.gather(*(self.runtime.waiter.peek(
            store.message_id_of(batch_id, line.line_no)) for line in queued))
        outcomes += [self._answered(line.line_no, done)
                     for line, done in zip(queued, finished, strict=True) if done is not None]
        if outcomes:
            await run_in_threadpool(store.record_lines, batch_id, outcomes)
        if not pending:
            await run_in_threadpool(store.finalize, batch_id)

    async def _queue(self, batch: store.ActiveBatch, line_no: int, body: dict[str, Any]
                     ) -> Outcome | None:
        """Queue one line (sent with the key that created the batch); its failure if it
        cannot be a message; None (still pending) if the broker cannot take it now."""
        try:
            fields = await run_in_threadpool(_fields, body)
            await self.runtime.accept(batch.agent_id, fields,
                                      store.message_id_of(batch.id, line_no),
                                      api_key=batch.api_key)
        except ServiceUnavailable:
            return None
        except AimeshError as exc:
            status, response = _response_of(exc)
            return (line_no, "failed", status, response)
        return (line_no, "queued", None, None)

    @staticmethod
    def _answered(line_no: int, done: Finished) -> Outcome:
        if done.ok:
            return (line_no, "completed", 200, completion(done.result))
        status, response = _response_of(done.result)
        return (line_no, "failed", status, response)
