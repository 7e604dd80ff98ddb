"""Before a worker starts on RabbitMQ: its queues can be declared as this worker declares
them.

RabbitMQ refuses to declare an existing queue with other arguments (PRECONDITION_FAILED,
"inequivalent arg"): a queue made as classic and a worker now on quorum queues
(AIMESH_RABBIT_QUEUE_TYPE), or made by another tool. Celery then stops the worker with
"Unrecoverable error" and the broker's words inside a traceback. Declared here first, each
queue the worker will consume, as Celery will declare it (its own queue table, so the
same arguments); a refusal becomes a ConfigError that names the queue, what the broker
said, and the two ways out. A broker that cannot be reached is left to Celery, which waits
for it as it always does.
"""

from __future__ import annotations

from typing import Any

from amqp.exceptions import PreconditionFailed  # type: ignore[import-untyped]
from kombu.utils.url import maybe_sanitize_url

from aimesh_tasks.errors import ConfigError
from aimesh_tasks.rabbit.queues import is_amqp
from aimesh_tasks.settings import get_settings

CONNECT_TIMEOUT_S = 5.0


def check_queues(app: Any, names: list[str]) -> None:
    """Declare `names` on the configured RabbitMQ as the worker will; ConfigError naming
    the queue if the broker refuses one. Nothing to do on another broker."""
    if not is_amqp(get_settings().broker_url):
        return
    connection = app.connection_for_write(connect_timeout=CONNECT_TIMEOUT_S)
    with connection:
        try:
            connection.ensure_connection(max_retries=1)
        except Exception:  # noqa: BLE001 - unreachable: Celery's own start-up waits for it
            return
        for name in names:
            queue = app.amqp.queues[name]  # made as Celery makes a missing queue
            try:
                queue.bind(connection.channel()).declare()
            except PreconditionFailed as exc:
                raise refused(name, exc) from None


def refused(name: str, exc: PreconditionFailed) -> ConfigError:
    """The error for a queue the configured broker will not declare with our arguments."""
    settings = get_settings()
    broker, queue_type = maybe_sanitize_url(settings.broker_url), settings.rabbit_queue_type
    said = str(getattr(exc, "reply_text", "") or exc).removeprefix("PRECONDITION_FAILED - ")
    return ConfigError(
        f"queue '{name}' on the broker at {broker} exists with other arguments than aimesh "
        f"declares it with (AIMESH_RABBIT_QUEUE_TYPE={queue_type}); the broker said: "
        f"{said}. RabbitMQ cannot change a queue's arguments. Fix: set "
        "AIMESH_RABBIT_QUEUE_TYPE to the type the queue was made with, or, once the queue "
        f"is empty and nothing sends to it, delete it (rabbitmqctl delete_queue {name}) "
        "and start again", setting="AIMESH_RABBIT_QUEUE_TYPE", queue=name)
