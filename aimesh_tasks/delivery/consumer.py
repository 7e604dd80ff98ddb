"""`GuardedConsumer`: Celery's consumer, with every message it cannot run dead-lettered.

Celery's own handlers for a message it cannot run log its body (payload text in the logs),
drop it without a result (`on_decode_error`: a body nested 100,000 deep leaves its
producer waiting for ever; `on_invalid_task`: a pickle content type), or reject it. Here
each one is moved to the dead-letter store, logged once without the payload, counted,
acked, and its task id (when the headers give one) gets an UndeliverableMessage result.
If the store cannot be reached, Celery's own handler runs, as before.

When the consumer builds its strategies (after every task module has been imported) it
gives every task that still has Celery's default Request the GuardedRequest
(`delivery.request`), and puts a check of the body's shape in front of each strategy:
Celery's strategy indexes the decoded body as [args, kwargs, embed] in the consumer's main
loop, so a body of `42` stopped the worker ("Unrecoverable error: TypeError"); now it is
an invalid task, dead-lettered like the others.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from celery.exceptions import InvalidTaskError
from celery.utils.collections import AttributeDict
from celery.worker.consumer import Consumer
from kombu.exceptions import ContentDisallowed

from aimesh_tasks.delivery.arguments import body_problem
from aimesh_tasks.delivery.request import message_queue, raw_message
from aimesh_tasks.delivery.terminal import bury_task

DEFAULT_REQUEST = "celery.worker.request:Request"
DELAYED_DELIVERY = "celery.worker.consumer.delayed_delivery:DelayedDelivery"
GUARDED_REQUEST = "aimesh_tasks.delivery.request:GuardedRequest"
logger = logging.getLogger(__name__)


def _headers(message: Any) -> dict[str, Any]:
    headers = message.headers
    return headers if isinstance(headers, dict) else {}


def result_request(message: Any, name: str | None) -> AttributeDict:
    """What the result backend needs to store a failure (as Celery's on_unknown_task)."""
    properties = message.properties or {}
    return AttributeDict(
        name=name, chord=None, root_id=_headers(message).get("root_id"), errbacks=None,
        correlation_id=properties.get("correlation_id"),
        reply_to=properties.get("reply_to"), ignore_result=False,
    )


def checked_body(strategy: Callable[..., Any]) -> Callable[..., Any]:
    """`strategy`, refusing a body that is not [args, kwargs, embed] as an invalid task
    (raised inside Celery's `on_task_received`, which hands it to `on_invalid_task`)."""

    def handler(message: Any, body: Any, *args: Any, **kwargs: Any) -> Any:
        problem = body_problem(message.payload if body is None else body)
        if problem is not None:
            raise InvalidTaskError(problem)
        return strategy(message, body, *args, **kwargs)

    return handler


class GuardedConsumer(Consumer):  # type: ignore[misc]
    """A consumer that dead-letters what it cannot run and keeps consuming."""

    class Blueprint(Consumer.Blueprint):  # type: ignore[misc]
        """Celery's consumer steps, without native delayed delivery: it works only through
        topic exchanges (ours are direct, one per queue) and binds only the queues a worker
        starts with, so on quorum queues it would declare 28 unused delay queues and warn
        about each queue; countdowns wait in the worker instead (README, RabbitMQ)."""

        default_steps = [step for step in Consumer.Blueprint.default_steps
                         if step != DELAYED_DELIVERY]

    def update_strategies(self) -> None:
        """Guard every task with Celery's default Request class, then build strategies
        that check the body first."""
        for task in self.app.tasks.values():
            if task.Request == DEFAULT_REQUEST:
                task.Request = GUARDED_REQUEST
        super().update_strategies()
        for name, strategy in self.strategies.items():
            self.strategies[name] = checked_body(strategy)

    def _bury(self, message: Any, reason: str, exc: BaseException | None) -> bool:
        headers = _headers(message)
        task_id, name = headers.get("id"), headers.get("task")
        task_id = task_id if isinstance(task_id, str) else None
        name = name if isinstance(name, str) else None
        detail = f"{type(exc).__name__}: {exc}" if exc is not None else "no task in the message"
        queue = message_queue(self.app, message)
        buried = bury_task(self.app, result_request(message, name),
                           queue=queue, raw=raw_message(message, queue),
                           reason=reason, detail=detail, task_id=task_id, task=name)
        if buried:
            message.ack_log_error(logger, self.connection_errors)
        return buried

    def on_decode_error(self, message: Any, exc: BaseException) -> None:
        """The body does not decode: bad JSON, nested too deep, unknown encoding."""
        if not self._bury(message, "undecodable_body", exc):
            super().on_decode_error(message, exc)

    def on_unknown_message(self, body: Any, message: Any) -> None:
        """An envelope that names no task."""
        if not self._bury(message, "not_a_task", None):
            super().on_unknown_message(body, message)

    def on_unknown_task(self, body: Any, message: Any, exc: BaseException) -> None:
        """A task name no worker registers."""
        if not self._bury(message, "unknown_task", exc):
            super().on_unknown_task(body, message, exc)

    def on_invalid_task(self, body: Any, message: Any, exc: BaseException) -> None:
        """A refused content type (pickle, yaml) or a task message Celery refuses."""
        reason = "content_type" if isinstance(exc, ContentDisallowed) else "invalid_task"
        if not self._bury(message, reason, exc):
            super().on_invalid_task(body, message, exc)
