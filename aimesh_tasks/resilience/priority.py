"""A message's priority as the broker's: AiMessage.priority 0 (lowest) .. 9 (highest).

| broker   | how it orders                                            | on the wire     |
|----------|----------------------------------------------------------|-----------------|
| Redis    | kombu keeps one list per priority step and BRPOPs the    | 9 - priority    |
|          | lists in step order, every queue's step 0 first: a lower |                 |
|          | number is served first. Ten steps, one per level.        |                 |
| RabbitMQ | queues declared with x-max-priority 9                    | priority        |
|          | (task_queue_max_priority); a higher number goes first    |                 |

The ten steps (`BROKER_PRIORITY_STEPS`) are set in celery_config's
broker_transport_options; the queue-depth exporter and queue positions read the same
lists. kombu's default steps are 0, 3, 6, 9, which would fold ten levels into four.
Queues already declared on RabbitMQ without x-max-priority must be deleted once (RabbitMQ
refuses to redeclare a queue with other arguments).
"""

from __future__ import annotations

from typing import Final

LOWEST: Final = 0
HIGHEST: Final = 9
DEFAULT: Final = 5  # AiMessage.priority's default
BROKER_PRIORITY_STEPS: Final[tuple[int, ...]] = tuple(range(LOWEST, HIGHEST + 1))
_AMQP: Final = ("amqp://", "amqps://", "pyamqp://", "librabbitmq://")


def higher_first(broker_url: str) -> bool:
    """True when the broker serves a higher priority number first (AMQP); Redis and
    kombu's virtual transports serve the lower number first."""
    return broker_url.startswith(_AMQP)


def broker_priority(priority: int, broker_url: str) -> int:
    """The broker priority of a message of `priority` (0-9, 9 the most urgent)."""
    if not LOWEST <= priority <= HIGHEST:
        raise ValueError(f"priority: must be {LOWEST}..{HIGHEST}, got {priority}")
    return priority if higher_first(broker_url) else HIGHEST - priority
