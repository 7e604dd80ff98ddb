"""Which workers serve each endpoint they announced, and when each was last seen (Redis).

A worker started with `aimesh worker --serve` beats every AIMESH_SERVE_HEARTBEAT_S: one
sorted set per endpoint (keys.servers), member the worker's node name, score its last
heartbeat in epoch seconds. A clean stop removes the worker at once; a killed one stops
beating, and its entry ages: a self-registered endpoint whose newest heartbeat is older
than AIMESH_SERVE_DOWN_AFTER_S has no live server (resilience/servers.py leaves it out of
routing). Entries older than a day are dropped, so the set shows who served it lately.

    queue_beat(batch, worker, ids, now)   queue_newest(batch, ids) -> {id: Server | None}
    withdraw(worker, ids)                 servers_of(ids) -> {id: [Server, newest first]}
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from aimesh_tasks import keys
from aimesh_tasks.redis_batch import Batch, Reader, run

KEPT_S = 86400  # a server not seen for a day is forgotten


@dataclass(frozen=True, slots=True)
class Server:
    """One worker serving an endpoint, and its last heartbeat (epoch s)."""

    worker: str
    last_seen: float

    def live(self, now: float, down_after_s: float) -> bool:
        """It beat within the bound."""
        return now - self.last_seen <= down_after_s


def queue_beat(batch: Batch, worker: str, endpoint_ids: Iterable[str], now: float) -> None:
    """Queue `worker`'s heartbeat for each endpoint it serves (and forget old servers)."""
    for endpoint_id in endpoint_ids:
        key = keys.servers(endpoint_id)
        batch.call("ZADD", key, repr(now), worker)
        batch.call("ZREMRANGEBYSCORE", key, "-inf", repr(now - KEPT_S))
        batch.call("EXPIRE", key, KEPT_S)


def beat(worker: str, endpoint_ids: Iterable[str], now: float | None = None) -> None:
    """`worker` lives and serves `endpoint_ids` (one round trip)."""
    batch = Batch()
    queue_beat(batch, worker, endpoint_ids, time.time() if now is None else now)
    batch.send()


def withdraw(worker: str, endpoint_ids: Iterable[str]) -> None:
    """`worker` stops serving `endpoint_ids`: it is no server of them from now on."""
    batch = Batch()
    for endpoint_id in endpoint_ids:
        batch.call("ZREM", keys.servers(endpoint_id), worker)
    batch.send()


def _server(reply: list[Any]) -> Server | None:
    """A ZRANGE ... WITHSCORES reply of one entry ([member, score] or [(member, score)])."""
    if not reply:
        return None
    first = reply[0]
    worker, score = first if isinstance(first, list | tuple) else (reply[0], reply[1])
    return Server(str(worker), float(score))


def queue_newest(batch: Batch, endpoint_ids: Iterable[str]
                 ) -> Reader[dict[str, Server | None]]:
    """Queue reading each endpoint's most recently seen server (one command each)."""
    ids = list(endpoint_ids)
    first = -1
    for endpoint_id in ids:
        index = batch.call("ZRANGE", keys.servers(endpoint_id), -1, -1, "WITHSCORES")
        first = index if first < 0 else first

    def read() -> dict[str, Server | None]:
        return {endpoint_id: _server(batch[first + i]) for i, endpoint_id in enumerate(ids)}

    return read


def newest(endpoint_ids: Iterable[str]) -> dict[str, Server | None]:
    """Each endpoint's most recently seen server, in one round trip."""
    ids = list(endpoint_ids)
    return run(lambda batch: queue_newest(batch, ids)) if ids else {}


def servers_of(endpoint_ids: Iterable[str]) -> dict[str, list[Server]]:
    """Every server each endpoint had lately, newest first (one round trip)."""
    ids = list(endpoint_ids)
    batch = Batch()
    for endpoint_id in ids:
        batch.call("ZREVRANGE", keys.servers(endpoint_id), 0, -1, "WITHSCORES")
    batch.send()
    return {endpoint_id: [Server(str(w), float(s)) for w, s in _pairs(batch[i])]
            for i, endpoint_id in enumerate(ids)}


def _pairs(reply: list[Any]) -> list[tuple[Any, Any]]:
    if reply and isinstance(reply[0], list | tuple):
        return [(pair[0], pair[1]) for pair in reply]
    return list(zip(reply[::2], reply[1::2], strict=True))
