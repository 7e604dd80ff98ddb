"""`DrainDeadLetters`: a worker consumer step that empties RabbitMQ's aimesh.dead queue
into the dead-letter store, so that `aimesh dead` lists RabbitMQ's dead letters as it
lists the Redis ones.

A quorum task queue dead-letters a message past its delivery limit (`rabbit.queues`) to
the aimesh.dead exchange, and RabbitMQ keeps it in the source queue until aimesh.dead has
it (at-least-once dead-lettering). Every worker on quorum queues consumes aimesh.dead
(declaring it, so that the first worker to start makes it exist): each message is stored
with its reason, its source queue and the deliveries that lost their worker, its task id
gets an UndeliverableMessage result, and only then is it acked. When the store cannot be
reached the message stays unacked on this channel, and RabbitMQ gives it to a consumer
again when the channel closes: nothing is dropped on the way.

RabbitMQ counts every return towards the delivery limit, runs or not: a worker holding a
message for its countdown (a retry's back-off, a hedge's delay) gives it back unrun when
it stops, and a quorum queue counts that as a delivery. So a message dead-lettered at its
limit is first checked against the worker's own count of deliveries screened on their way
to a pool (`delivery.deliveries`): when fewer than AIMESH_MAX_DELIVERIES were, it is put
back at the tail of its queue (at most `PUT_BACK_LIMIT` times, logged as
`delivery.put_back`), and only a message run that often is dead.
"""

from __future__ import annotations

import logging
import re
from typing import Any

from celery import bootsteps
from kombu.entity import Exchange, Queue
from kombu.messaging import Consumer

from aimesh_tasks.delivery import deliveries
from aimesh_tasks.delivery.consumer import result_request
from aimesh_tasks.delivery.dead_letters import OTHER_QUEUE
from aimesh_tasks.delivery.terminal import bury_task
from aimesh_tasks.keys import DEAD_EXCHANGE, DEAD_QUEUE
from aimesh_tasks.rabbit.envelope import envelope_of, publish_envelope
from aimesh_tasks.rabbit.queues import dead_queue_arguments, is_amqp, priorities_applied

logger = logging.getLogger(__name__)
# RabbitMQ writes the x-death queue name; anything else is kept out of labels and keys.
_QUEUE_NAME = re.compile(r"^[A-Za-z0-9._:-]{1,200}$")
# RabbitMQ's dead-lettering reasons, as the store's.
_REASONS = {"delivery_limit": "max_deliveries"}


def dead_queue() -> Queue:
    """aimesh.dead, bound to the fanout exchange every quorum task queue dead-letters to."""
    exchange = Exchange(DEAD_EXCHANGE, type="fanout", durable=True)  # type: ignore[no-untyped-call]
    return Queue(DEAD_QUEUE, exchange, durable=True,  # type: ignore[no-untyped-call]
                 queue_arguments=dead_queue_arguments())


def death_of(headers: dict[str, Any]) -> tuple[str, str]:
    """(source queue, RabbitMQ's reason) of a dead-lettered message, from its headers."""
    deaths = headers.get("x-death")
    first = deaths[0] if isinstance(deaths, list) and deaths and isinstance(
        deaths[0], dict) else {}
    queue = str(headers.get("x-first-death-queue") or first.get("queue") or "")
    reason = str(headers.get("x-first-death-reason") or first.get("reason") or "unknown")
    return (queue if _QUEUE_NAME.match(queue) else OTHER_QUEUE), reason


class DrainDeadLetters(bootsteps.ConsumerStep):  # type: ignore[misc]
    """Consume aimesh.dead into the dead-letter store (RabbitMQ quorum queues only)."""

    def __init__(self, parent: Any, **kwargs: Any) -> None:
        super().__init__(parent, **kwargs)
        self.app = parent.app

    def include_if(self, parent: Any) -> bool:
        from aimesh_tasks.settings import get_settings

        settings = get_settings()
        return is_amqp(settings.broker_url) and settings.rabbit_queue_type == "quorum"

    def get_consumers(self, channel: Any) -> list[Consumer]:
        _say_if_priorities_ignored(channel)
        return [Consumer(channel, queues=[dead_queue()],  # type: ignore[no-untyped-call]
                         on_message=self.on_message, prefetch_count=10)]

    def on_message(self, message: Any) -> None:
        """Put a message dead-lettered unrun back on its queue, or store the dead letter;
        then ack it (or leave it unacked if Redis or the broker cannot be reached)."""
        headers = message.headers if isinstance(message.headers, dict) else {}
        queue, why = death_of(headers)
        task_id, name = headers.get("id"), headers.get("task")
        task_id = task_id if isinstance(task_id, str) else None
        name = name if isinstance(name, str) else None
        detail = _detail(why)
        if why == "delivery_limit" and task_id is not None and queue != OTHER_QUEUE:
            try:
                dead_because = _put_back_if_unrun(message, queue, task_id)
            except Exception:  # stays unacked: given again when this channel closes
                logger.exception("dead_letter.put_back_failed",
                                 extra={"queue": queue, "task_id": task_id})
                return
            if dead_because is None:
                message.ack()
                return
            detail = dead_because
        reason = _REASONS.get(why, "dead_lettered")
        buried = bury_task(self.app, result_request(message, name), queue=queue,
                           raw=envelope_of(message, queue), reason=reason, detail=detail,
                           task_id=task_id, task=name, history=_history(task_id))
        if buried:
            message.ack()


def _put_back_if_unrun(message: Any, queue: str, task_id: str) -> str | None:
    """Put a message RabbitMQ dead-lettered at its delivery limit back at the tail of
    `queue` when some of its deliveries were returns no worker ran (None), or say why it
    is dead all the same. RabbitMQ counts every return of a message: a worker that holds
    one for its countdown and stops gives it back, and is counted as a delivery that ran."""
    from aimesh_tasks.settings import get_settings

    settings = get_settings()
    limit = settings.max_deliveries
    runs, put_back = deliveries.runs_at_most(task_id), deliveries.put_back_so_far(task_id)
    if not deliveries.put_back_unrun(runs, put_back, limit):
        if runs >= limit:
            return _detail("delivery_limit")
        return (f"delivered {limit} times, run at most {runs}; put back on {queue} "
                f"{put_back} times already (a worker that stops or dies while it holds the "
                "message gives it back to RabbitMQ, which counts it as a delivery)")
    times = deliveries.count_put_back(task_id)  # before the publish: a crash overcounts
    publish_envelope(settings.broker_url, queue, envelope_of(message, queue))
    logger.warning("delivery.put_back", extra={
        "task_id": task_id, "queue": queue, "runs_at_most": runs, "put_back": times,
        "detail": f"RabbitMQ's delivery limit counted {limit - runs} or more returns of "
                  "a message no worker ran; it is put back at the tail of its queue"})
    return None


def _history(task_id: str | None) -> list[dict[str, Any]]:
    """The deliveries of `task_id` that lost their worker; [] when Redis cannot say."""
    if task_id is None:
        return []
    try:
        return deliveries.history(task_id)
    except Exception:  # the history is a nicety; the store's own failure is handled
        logger.exception("delivery.history_failed", extra={"task_id": task_id})
        return []


def _detail(why: str) -> str:
    from aimesh_tasks.settings import get_settings

    if why == "delivery_limit":
        limit = get_settings().max_deliveries
        return (f"delivered {limit} times; at most {limit} are run (AIMESH_MAX_DELIVERIES, "
                "RabbitMQ's x-delivery-limit)")
    return f"RabbitMQ dead-lettered it ({why})"


def _say_if_priorities_ignored(channel: Any) -> None:
    """Log once per connection that quorum queues on this RabbitMQ ignore priorities."""
    properties = getattr(channel.connection, "server_properties", None) or {}
    version = str(properties.get("version", ""))
    if not priorities_applied("quorum", version):
        logger.warning("broker.priorities_not_applied", extra={
            "rabbitmq": version, "setting": "AIMESH_RABBIT_QUEUE_TYPE",
            "detail": "quorum queues serve messages in order (FIFO) before RabbitMQ 4.0; "
                      "set AIMESH_RABBIT_QUEUE_TYPE=classic for priorities"})
