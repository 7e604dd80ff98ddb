"""Delivery guards: whatever sits on a queue, a worker keeps consuming.

Three guards, one per layer a bad message can stop a worker at, each moving what it cannot
run to the dead-letter store (`dead_letters`: counted, logged once, `aimesh dead`):

| guard                         | where it runs                 | what it sets aside           |
|-------------------------------|-------------------------------|------------------------------|
| `transport.GuardedTransport`  | kombu's Redis decode of the   | bytes that are not JSON, or  |
|                               | popped item (main process)    | JSON that is not an envelope |
| `consumer.GuardedConsumer`    | Celery's handlers for bad     | no task, unknown task, pickle|
|                               | messages (main process)       | content, undecodable body    |
| `request.GuardedRequest`      | hand-off to the pool (main    | bad arguments; a task that   |
|                               | process)                      | killed its worker N times    |

Where the task id is known, its producer's `AsyncResult.get()` raises UndeliverableMessage
instead of waiting for ever. `install(app)` turns all three on from the app configuration
(no URL changes); settings a deployment sets itself take precedence.
"""

from __future__ import annotations

from typing import Any

GUARDED_TRANSPORT = "aimesh_tasks.delivery.transport:GuardedTransport"
GUARDED_CONSUMER = "aimesh_tasks.delivery.consumer:GuardedConsumer"
REDIS_SCHEMES = ("redis://", "rediss://")


def guarded_defaults() -> dict[str, str]:
    """The Celery settings that install the guards for the configured broker."""
    from aimesh_tasks.settings import get_settings

    defaults = {"worker_consumer": GUARDED_CONSUMER}
    if get_settings().broker_url.startswith(REDIS_SCHEMES):
        defaults["broker_transport"] = GUARDED_TRANSPORT
    return defaults


def install(app: Any) -> None:
    """Install the guards on `app`, as defaults read when its configuration loads."""
    app.add_defaults(guarded_defaults)
