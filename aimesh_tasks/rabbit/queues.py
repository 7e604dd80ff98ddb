"""The arguments RabbitMQ task queues are declared with, by AIMESH_RABBIT_QUEUE_TYPE.

| type    | declared with                                  | gives                       |
|---------|------------------------------------------------|-----------------------------|
| quorum  | x-queue-type quorum, x-delivery-limit          | durable and replicated (a   |
| (the    | AIMESH_MAX_DELIVERIES - 1, x-dead-letter-      | Raft log on a majority of   |
| default)| exchange aimesh.dead, at-least-once dead-      | nodes); a message returned  |
|         | lettering (x-dead-letter-strategy, which needs | N times goes to aimesh.dead |
|         | x-overflow reject-publish)                     | instead of looping; no      |
|         |                                                | priorities before 4.0: FIFO |
| classic | x-max-priority 9                               | AiMessage.priority orders   |
|         |                                                | the queue; no delivery      |
|         |                                                | limit on the broker (the    |
|         |                                                | worker's own cap still      |
|         |                                                | holds: delivery/request.py) |

Quorum is the default because it is the queue type that does not lose an accepted
message when a node fails or restarts (the reliability issue's rule); on RabbitMQ 3.x it
ignores message priorities (and refuses x-max-priority), so a deployment that needs
priorities chooses classic and gives up the broker's delivery limit. That is the rule, and
a worker starting on quorum queues on RabbitMQ before 4.0 logs it once
(`broker.priorities_not_applied`).

The delivery limit counts returns (a worker process lost, a connection closed): a message
returned AIMESH_MAX_DELIVERIES - 1 times is delivered AIMESH_MAX_DELIVERIES times at most,
then dead-lettered, the same cap as the worker's own counter on Redis.
"""

from __future__ import annotations

from typing import Any, Final

from aimesh_tasks.keys import DEAD_EXCHANGE

AMQP_SCHEMES: Final = ("amqp://", "amqps://", "pyamqp://")
MAX_PRIORITY: Final = 9


def is_amqp(broker_url: str) -> bool:
    """True for a RabbitMQ (AMQP 0-9-1) broker URL."""
    return broker_url.startswith(AMQP_SCHEMES)


def delivery_limit(max_deliveries: int) -> int:
    """RabbitMQ's x-delivery-limit (returns allowed) for at most `max_deliveries` runs."""
    if max_deliveries < 1:
        raise ValueError(f"max_deliveries: must be at least 1, got {max_deliveries}")
    return max_deliveries - 1


def queue_arguments(queue_type: str, max_deliveries: int) -> dict[str, Any]:
    """The x-arguments of a task queue of `queue_type` ('quorum' or 'classic')."""
    if queue_type == "classic":
        return {"x-max-priority": MAX_PRIORITY}
    if queue_type != "quorum":
        raise ValueError(f"queue_type: must be 'quorum' or 'classic', got {queue_type!r}")
    return {
        "x-queue-type": "quorum",
        "x-delivery-limit": delivery_limit(max_deliveries),
        "x-dead-letter-exchange": DEAD_EXCHANGE,
        # Kept in the source queue until aimesh.dead has it (not dropped on the way); this
        # strategy is refused unless the queue rejects publishes when full.
        "x-dead-letter-strategy": "at-least-once",
        "x-overflow": "reject-publish",
    }


def dead_queue_arguments() -> dict[str, Any]:
    """The x-arguments of aimesh.dead: a quorum queue with no limit of its own."""
    return {"x-queue-type": "quorum"}


def priorities_applied(queue_type: str, server_version: str) -> bool:
    """False when quorum queues on this RabbitMQ version ignore message priorities."""
    if queue_type == "classic":
        return True
    major = server_version.split(".", 1)[0]
    return major.isdigit() and int(major) >= 4
