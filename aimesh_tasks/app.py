"""The Celery application and its start-up checks."""

from __future__ import annotations

from typing import Any

from celery import Celery, signals

from aimesh_tasks.delivery import install as install_delivery_guards
from aimesh_tasks.errors import ConfigError
from aimesh_tasks.follow import FollowEndpoints
from aimesh_tasks.observability.worker import install as install_observability
from aimesh_tasks.settings import get_settings
from aimesh_tasks.worker_steps import BackgroundJobsStep

app = Celery("aimesh_tasks")
app.config_from_object("celeryconfig")
app.steps["consumer"].add(FollowEndpoints)
app.steps["worker"].add(BackgroundJobsStep)
install_observability()
install_delivery_guards(app)

_VISIBILITY_BROKERS = ("redis://", "rediss://", "sqs://", "redis+socket://")
# RabbitMQ closes a channel whose delivery stays unacked past consumer_timeout (30 min).
RABBITMQ_CONSUMER_TIMEOUT_S = 1800


def check_delivery_settings() -> None:
    """Refuse settings under which an acks_late message could run twice at once."""
    settings = get_settings()
    broker = settings.broker_url
    if broker.startswith(_VISIBILITY_BROKERS):
        if settings.visibility_timeout_s <= settings.task_time_limit_s:
            raise ConfigError(
                f"AIMESH_VISIBILITY_TIMEOUT_S ({settings.visibility_timeout_s}) must exceed "
                f"AIMESH_TASK_TIME_LIMIT_S ({settings.task_time_limit_s:g}): otherwise the "
                "broker redelivers a message while its task still runs",
                setting="AIMESH_VISIBILITY_TIMEOUT_S",
            )
    elif broker.startswith(("amqp://", "amqps://", "pyamqp://")):
        if settings.task_time_limit_s >= RABBITMQ_CONSUMER_TIMEOUT_S:
            raise ConfigError(
                f"AIMESH_TASK_TIME_LIMIT_S ({settings.task_time_limit_s:g}) must be below "
                f"RabbitMQ's consumer_timeout ({RABBITMQ_CONSUMER_TIMEOUT_S} s)",
                setting="AIMESH_TASK_TIME_LIMIT_S",
            )


@signals.worker_init.connect
def _check_before_worker_starts(**_: Any) -> None:
    check_delivery_settings()


@signals.worker_process_init.connect
def _fresh_connections_after_fork(**_: Any) -> None:
    from aimesh_tasks.db import dispose_engines

    dispose_engines(close=False)
