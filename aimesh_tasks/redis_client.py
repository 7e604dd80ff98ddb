"""The process-wide Redis client: real Redis, or an in-process fake in embedded mode."""

from __future__ import annotations

from functools import lru_cache
from typing import Any

import redis

from aimesh_tasks.settings import MEMORY_URL, get_settings

RedisClient = redis.Redis


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
    return redis.Redis.from_url(url, decode_responses=True, health_check_interval=30,
                                socket_timeout=timeout_s, socket_connect_timeout=timeout_s)


def get_redis(url: str | None = None) -> redis.Redis:
    """The Redis client for `url` (default AIMESH_REDIS_URL); redis-py reconnects after fork."""
    client: redis.Redis = _client(url or get_settings().redis_url)
    return client


def reset_redis_clients() -> None:
    """Forget cached clients (tests that switch AIMESH_REDIS_URL)."""
    _client.cache_clear()
