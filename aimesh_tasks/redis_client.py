"""The process-wide Redis client: real Redis, or an in-process fake in embedded mode.

Its connections come from one pool per process, sized by `aimesh_tasks.pools` (a worker:
one per task it runs at once plus its own threads, at most 64). A thread that finds them
all busy waits for one, up to AIMESH_REDIS_TIMEOUT_S, then gets RedisPoolExhausted, never
a hang.
"""

from __future__ import annotations

from functools import lru_cache
from queue import Empty, LifoQueue
from typing import Any

import redis

from aimesh_tasks.pools import redis_connections
from aimesh_tasks.settings import MEMORY_URL, get_settings

RedisClient = redis.Redis


class RedisPoolExhausted(redis.ConnectionError):
    """Every connection of this process's Redis pool stayed busy for the whole wait. A
    redis ConnectionError, so the task shells retry it as an outage."""

    def __init__(self, size: int, waited_s: float) -> None:
        super().__init__(
            f"all {size} Redis connections of this process stayed busy for {waited_s:g} s "
            "(AIMESH_REDIS_TIMEOUT_S). A thread holds one for a round trip at a time, so "
            "this means a slow Redis, or more threads making round trips at once than the pool "
            "has. Fix: raise AIMESH_REDIS_MAX_CONNECTIONS (every process of the cluster "
            "shares the server's maxclients)")
        self.size = size


class _FreeSlots(LifoQueue):  # type: ignore[type-arg]
    """The free connections of a BlockingConnectionPool; running out of time while
    waiting for one raises RedisPoolExhausted instead of redis-py's bare
    "No connection available."."""

    def get(self, block: bool = True, timeout: float | None = None) -> Any:
        try:
            return super().get(block, timeout)
        except Empty:
            raise RedisPoolExhausted(self.maxsize, timeout or 0.0) from None


@lru_cache(maxsize=4)
def _client(url: str) -> Any:
    if url.startswith(MEMORY_URL):
        # Embedded mode only: fakeredis with Lua (lupa), shared by every thread of this process.
        import fakeredis

        return fakeredis.FakeRedis(server=fakeredis.FakeServer(), decode_responses=True)
    # A socket timeout, so that a Redis that stops answering (paused, partitioned) raises
    # redis.TimeoutError, which the task shells retry, instead of hanging a task until its
    # soft time limit.
    timeout_s = get_settings().redis_timeout_s
    pool = redis.BlockingConnectionPool.from_url(
        url, max_connections=redis_connections(), timeout=timeout_s, queue_class=_FreeSlots,
        decode_responses=True, health_check_interval=30, socket_timeout=timeout_s,
        socket_connect_timeout=timeout_s)
    return redis.Redis(connection_pool=pool)


def get_redis(url: str | None = None) -> redis.Redis:
    """The Redis client for `url` (default AIMESH_REDIS_URL); redis-py reconnects after fork."""
    client: redis.Redis = _client(url or get_settings().redis_url)
    return client


def reset_redis_clients() -> None:
    """Forget cached clients (a worker sizing its pool at start, tests that switch
    AIMESH_REDIS_URL)."""
    _client.cache_clear()
