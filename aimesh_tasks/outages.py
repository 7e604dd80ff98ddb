"""What a transient outage of a server the cluster depends on looks like, in one place.

A Redis, Postgres or broker error of this kind (connection refused, reset, timed out; a
statement or lock timeout; a connection pool whose every connection stayed busy:
aimesh_tasks/pools.py) means "try again shortly", not "this message is bad": tasks retry it
with backoff (aimesh_tasks/tasks/shell.py) and the ingress answers 503 with Retry-After.
"""

from __future__ import annotations

import kombu.exceptions
import redis.exceptions
import sqlalchemy.exc

TRANSIENT: tuple[type[BaseException], ...] = (
    redis.exceptions.ConnectionError,
    redis.exceptions.TimeoutError,
    sqlalchemy.exc.OperationalError,
    sqlalchemy.exc.InterfaceError,
    sqlalchemy.exc.TimeoutError,  # the pool's wait for a free connection (DbPoolExhausted)
    kombu.exceptions.OperationalError,
)


def service_of(exc: BaseException) -> str:
    """Which server an outage error came from: "broker", "Redis" or "Postgres"."""
    if isinstance(exc, kombu.exceptions.OperationalError):
        return "broker"
    return "Redis" if isinstance(exc, redis.exceptions.RedisError) else "Postgres"
