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
from aimesh_tasks.rabbit.envelope import envelope_of
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
        """Store one dead letter, then ack it (or leave it unacked if the store is down)."""
        headers = message.headers if isinstance(message.headers, dict) else {}
        queue, why = death_of(headers)
        task_id, name = headers.get("id"), headers.get("task")
        task_id = task_id if isinstance(task_id, str) else None
        name = name if isinstance(name, str) else None
        reason = _REASONS.get(why, "dead_lettered")
        buried = bury_task(self.app, result_request(message, name), queue=queue,
                           raw=envelope_of(message, queue), reason=reason,
                           detail=_detail(why), task_id=task_id, task=name,
                           history=_history(task_id))
        if buried:
            message.ack()


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
