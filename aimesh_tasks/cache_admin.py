"""Clearing the answer caches (exact and semantic), for an operator.

Deletes every cached answer (`keys.cache_entry`) and every semantic-cache entry and index
(`keys.semantic_entry`, `keys.semantic_index`), found with SCAN (never KEYS: the server is
not blocked). Flights in progress, hand-offs and counters are left alone: a message in
flight still ends and answers its followers, it only finds no cached answer next time.
"""

from __future__ import annotations

from aimesh_tasks import keys
from aimesh_tasks.redis_client import get_redis

SCAN_COUNT = 1000


def cache_patterns() -> list[str]:
    """The SCAN patterns of every cache key."""
    return [keys.cache_entry("*"), keys.semantic_entry("*", "*"), keys.semantic_index("*")]


def clear_cache() -> int:
    """Delete every cached answer; the number of keys deleted."""
    client = get_redis()
    deleted = 0
    for pattern in cache_patterns():
        batch: list[str] = []
        for name in client.scan_iter(match=pattern, count=SCAN_COUNT):
            batch.append(name)
            if len(batch) >= SCAN_COUNT:
                deleted += int(client.delete(*batch))
                batch = []
        if batch:
            deleted += int(client.delete(*batch))
    return deleted
