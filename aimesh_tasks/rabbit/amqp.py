"""Celery's AMQP integration, with every task queue declared by `rabbit.queues`' rules.

Celery creates our queues as it first meets them (`task_create_missing_queues`: the
route queue, and each endpoint's queue when a worker starts to follow it or a producer
first sends to it); `BrokerQueues` gives each one the arguments of AIMESH_RABBIT_QUEUE_TYPE
as it enters the table, so producers and workers declare a queue alike (RabbitMQ refuses
a second declaration with other arguments). Installed with `Celery(amqp=BROKER_AMQP)`;
on another broker it changes nothing.
"""

from __future__ import annotations

from typing import Any

from celery.app.amqp import AMQP, Queues

from aimesh_tasks.rabbit.queues import is_amqp, queue_arguments

BROKER_AMQP = "aimesh_tasks.rabbit.amqp:BrokerAMQP"


def task_queue_arguments() -> dict[str, Any]:
    """The arguments our task queues get on the configured broker ({} if not RabbitMQ)."""
    from aimesh_tasks.settings import get_settings

    settings = get_settings()
    if not is_amqp(settings.broker_url):
        return {}
    return queue_arguments(settings.rabbit_queue_type, settings.max_deliveries)


class BrokerQueues(Queues):  # type: ignore[misc]
    """Celery's queue table; a queue entering it gets our broker arguments, under any it
    was declared with itself."""

    def __setitem__(self, name: str, queue: Any) -> None:
        ours = task_queue_arguments()
        if ours and not (queue.exclusive or queue.auto_delete):
            queue.queue_arguments = {**ours, **(queue.queue_arguments or {})}
        super().__setitem__(name, queue)


class BrokerAMQP(AMQP):  # type: ignore[misc]
    """Celery's `app.amqp`, with `BrokerQueues` as its queue table."""

    queues_cls = BrokerQueues
