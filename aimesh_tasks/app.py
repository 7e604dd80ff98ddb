"""The Celery application and its start-up checks.

Importing this module builds the app (importing `aimesh_tasks` or a pure-core module
does not: the package exposes `app` lazily). Its settings come from
`aimesh_tasks.celery_config` (inside the package), then a deployment's own
`celeryconfig` module when one is found and declares `AIMESH_OVERRIDES = True`; the
delivery guarantees in `celery_config.GUARANTEED` are applied last, whatever it says.
"""

from __future__ import annotations

import logging
import sys
import types
from typing import Any

from celery import Celery, signals

from aimesh_tasks.delivery import install as install_delivery_guards
from aimesh_tasks.errors import ConfigError
from aimesh_tasks.follow import FollowEndpoints
from aimesh_tasks.observability.worker import install as install_observability
from aimesh_tasks.observability.worker import never_silent
from aimesh_tasks.rabbit.amqp import BROKER_AMQP
from aimesh_tasks.rabbit.drain import DrainDeadLetters
from aimesh_tasks.serving import ServeEndpoints
from aimesh_tasks.settings import Settings, get_settings
from aimesh_tasks.worker_steps import BackgroundJobsStep

logger = logging.getLogger(__name__)
_VISIBILITY_BROKERS = ("redis://", "rediss://", "sqs://", "redis+socket://")
# RabbitMQ closes a channel whose delivery stays unacked past consumer_timeout (30 min).
RABBITMQ_CONSUMER_TIMEOUT_S = 1800


def build_app() -> Celery:
    """A configured aimesh-tasks Celery app."""
    built = Celery("aimesh_tasks", amqp=BROKER_AMQP)
    # Loaded on first use of the configuration (Celery reads it lazily), so settings
    # changed before then (the CLI's --broker, say) are the ones used.
    built.config_from_object("aimesh_tasks.celery_config")
    built.steps["consumer"].add(FollowEndpoints)
    built.steps["consumer"].add(ServeEndpoints)
    built.steps["consumer"].add(DrainDeadLetters)
    built.steps["worker"].add(BackgroundJobsStep)
    install_delivery_guards(built)
    return built


app = build_app()
install_observability()


def check_delivery_settings() -> None:
    """Refuse settings under which an acks_late message could run twice at once, or a
    Redis broker that may evict queued messages."""
    settings = get_settings()
    broker = settings.broker_url
    if broker.startswith(("redis://", "rediss://")):
        check_broker_keeps_messages(broker)
    if broker.startswith(_VISIBILITY_BROKERS):
        if settings.visibility_timeout_s <= settings.task_time_limit_s:
            raise ConfigError(
                f"AIMESH_VISIBILITY_TIMEOUT_S ({settings.visibility_timeout_s}) must exceed "
                f"AIMESH_TASK_TIME_LIMIT_S ({settings.task_time_limit_s:g}): otherwise the "
                "broker redelivers a message while its task still runs",
                setting="AIMESH_VISIBILITY_TIMEOUT_S",
            )
        check_countdowns(settings)
    elif broker.startswith(("amqp://", "amqps://", "pyamqp://")):
        if settings.task_time_limit_s >= RABBITMQ_CONSUMER_TIMEOUT_S:
            raise ConfigError(
                f"AIMESH_TASK_TIME_LIMIT_S ({settings.task_time_limit_s:g}) must be below "
                f"RabbitMQ's consumer_timeout ({RABBITMQ_CONSUMER_TIMEOUT_S} s)",
                setting="AIMESH_TASK_TIME_LIMIT_S",
            )


def check_countdowns(settings: Settings) -> None:
    """Refuse a retry wait longer than half the visibility timeout: a call re-published
    with a countdown waits unacked in a worker, and Redis redelivers it to another worker
    once the visibility timeout passes (two copies of one call task)."""
    waits = [("AIMESH_RETRY_MAX_DELAY_S", settings.retry_max_delay_s)]
    if settings.breaker_enabled and settings.breaker_all_open == "soonest":
        waits.append(("AIMESH_BREAKER_COOLDOWN_MAX_S", settings.breaker_cooldown_max_s))
    for name, wait_s in waits:
        if wait_s > settings.visibility_timeout_s / 2:
            raise ConfigError(
                f"{name} ({wait_s:g}) must be at most half of AIMESH_VISIBILITY_TIMEOUT_S "
                f"({settings.visibility_timeout_s}): a longer wait is a countdown message the "
                f"broker would deliver twice. Fix: lower {name} or raise "
                "AIMESH_VISIBILITY_TIMEOUT_S", setting=name)


def check_broker_keeps_messages(broker: str) -> None:
    """Refuse a Redis broker whose maxmemory-policy evicts keys: under memory pressure it
    would drop queued messages (whole queues are keys). Only logged when it cannot be
    asked (unreachable yet, or CONFIG disabled, as on some managed services)."""
    import redis
    from kombu.utils.url import maybe_sanitize_url

    shown = maybe_sanitize_url(broker)
    client = redis.Redis.from_url(broker, socket_connect_timeout=5, socket_timeout=5)
    try:
        policy = client.config_get("maxmemory-policy").get("maxmemory-policy")
    except redis.RedisError as exc:
        logger.warning("broker.eviction_unchecked", extra={
            "broker": shown, "error": f"{type(exc).__name__}: {exc}"})
        return
    finally:
        client.close()
    if policy not in (None, "noeviction"):
        raise ConfigError(
            f"the broker Redis at {shown} has maxmemory-policy '{policy}': under memory "
            "pressure it evicts keys, and a queue is a key, so accepted messages would be "
            "lost. Fix: run CONFIG SET maxmemory-policy noeviction on it (and set "
            "maxmemory-policy noeviction in its redis.conf), or give a broker that does not "
            "evict", setting="maxmemory-policy", value=policy)


@signals.worker_init.connect
@never_silent  # Celery would log and ignore the ConfigError, and the worker would run
def _check_before_worker_starts(**_: Any) -> None:
    check_delivery_settings()


@signals.worker_init.connect
@never_silent
def _size_pools(sender: Any, **_: Any) -> None:
    """Size this worker's connection pools from the tasks each of its processes runs at
    once (aimesh_tasks/pools.py); before the pool forks, so prefork children inherit it."""
    from aimesh_tasks import pools
    from aimesh_tasks.redis_client import reset_redis_clients

    pools.size_for_worker(sender.pool_cls, sender.concurrency)
    sender.app.conf.update(pools.celery_settings(sender.app.conf))
    reset_redis_clients()  # a client made before now (the CLI's registry read) is undersized


@signals.worker_process_init.connect
def _fresh_connections_after_fork(**_: Any) -> None:
    from aimesh_tasks.db import dispose_engines

    dispose_engines(close=False)


class _AppModule(types.ModuleType):
    """This module, as `aimesh_tasks.app`, stands for the app: the package exports `app`
    lazily (importing the package builds nothing), but once this module is imported,
    Python binds the package's `app` attribute to the module itself. Attributes the
    module lacks (`control`, `send_task`, `conf`, ...) are therefore the app's."""

    def __getattr__(self, name: str) -> Any:
        return getattr(app, name)


sys.modules[__name__].__class__ = _AppModule
