"""`GuardedRequest`: a Celery Request that screens a task message in the worker's main
process before a pool process is given it.

Install it per task class with `Request = "aimesh_tasks.delivery.request:GuardedRequest"`
(or for every task with `aimesh_tasks.delivery.install(app)`). Screening happens once per
delivery, when the request is handed to the pool (the first thing Celery's generated
`execute_using_pool` does is ask `revoked()`; a True answer skips the message), so a child
that dies still leaves the count behind in Redis:

- headers the main process reads as numbers that are not (`timelimit`, `retries`) are
  dead-lettered as `invalid_task`, and arguments that do not fit the task function
  (`delivery.arguments`) as `bad_arguments`, instead of failing inside the task with an
  unreadable error;
- a redelivered message is counted per task id; beyond AIMESH_MAX_DELIVERIES it is
  dead-lettered as `max_deliveries` with the deliveries that lost their worker. Without
  the cap, `task_reject_on_worker_lost` requeues a task that segfaults, calls `os._exit`
  or is OOM-killed for ever.

Either way the message is acked and its task id gets an UndeliverableMessage result. A
message whose body does not unpack into (args, kwargs, embed) raises Celery's
InvalidTaskError, which the consumer handles (rejects it, or dead-letters it with
`delivery.consumer`) instead of stopping on a TypeError.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from billiard.exceptions import WorkerLostError
from celery.exceptions import InvalidTaskError
from celery.worker import state
from celery.worker.request import Request

from aimesh_tasks.delivery import deliveries
from aimesh_tasks.delivery.arguments import argument_problem, header_problem
from aimesh_tasks.delivery.dead_letters import OTHER_QUEUE
from aimesh_tasks.delivery.terminal import bury_task
from aimesh_tasks.rabbit.envelope import envelope_of
from aimesh_tasks.settings import get_settings

logger = logging.getLogger(__name__)


def raw_message(message: Any, queue: str) -> bytes:
    """The message as it sat on `queue`: the envelope on virtual transports (Redis), an
    envelope of the same shape on RabbitMQ."""
    raw = getattr(message, "_raw", None)
    if isinstance(raw, dict):
        return json.dumps(raw).encode()
    return envelope_of(message, queue)


def message_queue(app: Any, message: Any) -> str:
    """The queue a message was published to (its routing key on our direct exchanges), if
    this worker consumes it, else '_other': the key comes from whoever wrote the message,
    and only queues the worker reads may become metric labels and dead-letter streams."""
    info = message.delivery_info or {}
    queue = str(info.get("routing_key") or info.get("exchange") or "")
    return queue if queue in app.amqp.queues.consume_from else OTHER_QUEUE


class GuardedRequest(Request):  # type: ignore[misc]
    """A Request that dead-letters bad arguments and tasks that keep killing their worker."""

    _screened: bool | None = None

    def __init__(self, message: Any, *args: Any, **kwargs: Any) -> None:
        try:
            super().__init__(message, *args, **kwargs)
        except (TypeError, ValueError, KeyError) as exc:  # e.g. a body that is not a list
            raise InvalidTaskError(f"malformed task message: {type(exc).__name__}: {exc}"
                                   ) from exc

    def revoked(self) -> bool:
        """True when revoked, expired, or set aside by the screening (once per delivery)."""
        if self._screened is None:
            try:
                self._screened = self._screen()
            except Exception:  # fail open: without Redis, the message runs as unguarded
                logger.exception("delivery.screening_failed", extra={"task_id": self.id})
                self._screened = False
        return self._screened or bool(super().revoked())

    def _screen(self) -> bool:
        problem = header_problem(self.request_dict)
        if problem is not None:
            return self._bury("invalid_task", problem)
        problem = argument_problem(self.task.run, self.args, self.kwargs)
        if problem is not None:
            return self._bury("bad_arguments", problem)
        if not self.delivery_info.get("redelivered"):
            return False
        limit = get_settings().max_deliveries
        delivered = deliveries.count_redelivery(self.id)
        if delivered <= limit:
            return False
        return self._bury("max_deliveries",
                          f"delivered {delivered} times; at most {limit} are run "
                          "(AIMESH_MAX_DELIVERIES)", deliveries.history(self.id))

    def _bury(self, reason: str, detail: str, history: list[dict[str, Any]] | None = None
              ) -> bool:
        queue = message_queue(self.app, self.message)
        buried = bury_task(self.app, self._context, queue=queue,
                           raw=raw_message(self.message, queue), reason=reason, detail=detail,
                           task_id=self.id, task=self.name, history=history or [])
        if buried:
            self.acknowledge()
            state.task_ready(self)
        return buried

    def on_failure(self, exc_info: Any, send_failed_event: bool = True,
                   return_ok: bool = False) -> Any:
        """Note a delivery whose worker process died, then Celery's own handling."""
        exc = getattr(exc_info.exception, "exc", exc_info.exception)
        cancelled = self._already_cancelled or self._already_revoked
        if isinstance(exc, WorkerLostError | SystemExit) and not cancelled:
            try:
                deliveries.record_lost_worker(self.id, self.hostname,
                                              f"{type(exc).__name__}: {exc}")
            except Exception:  # the history is a nicety; Celery's handling must still run
                logger.exception("delivery.history_failed", extra={"task_id": self.id})
        return super().on_failure(exc_info, send_failed_event=send_failed_event,
                                  return_ok=return_ok)
