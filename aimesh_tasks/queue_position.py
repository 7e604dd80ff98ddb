"""Where a queued message stands: its queue, how many messages are ahead, an ETA.

Kombu's Redis transport LPUSHes a message and workers BRPOP from the other end, so in a
queue list the message at index i has `len - 1 - i` messages ahead of it (in the same
priority step; higher steps are served first, so they are all ahead too). A message not
found in any queue is at a worker (prefetched or running) or between two hops. Finding it
reads the lists (LRANGE), so the cost grows with the queue: this is for polling, not for
the message path.

The ETA uses the endpoint's live figures: calls finish at about `in_flight / p50` per
second (at least one call at a time), so `(ahead + 1) / that` seconds.

`on_enqueue` is the other view, taken by the router when it hands a message to an
endpoint whose every candidate is at capacity: how many messages the message will have
ahead of it (the lengths of its priority step's list and of those served before it, one
round trip). It travels on the envelope to the result (`AiResult.queue_position`) and the
ingress's `X-Aimesh-Queue-Position` header.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import redis

from aimesh_tasks import keys
from aimesh_tasks.observability.exporter import broker_client, priority_lists
from aimesh_tasks.registry.live import LiveFigures
from aimesh_tasks.resilience.priority import broker_priority

logger = logging.getLogger(__name__)

SCAN_CHUNK = 1000


@dataclass(frozen=True, slots=True)
class QueuePosition:
    """A message found waiting in `queue`, with `ahead` messages to be served before it."""

    queue: str
    endpoint_id: str | None
    ahead: int
    depth: int

    def to_dict(self) -> dict[str, Any]:
        return {"queue": self.queue, "endpoint_id": self.endpoint_id, "ahead": self.ahead,
                "depth": self.depth}


def _task_id(raw: bytes | str) -> str | None:
    try:
        return str(json.loads(raw)["headers"]["id"])
    except (ValueError, KeyError, TypeError):
        return None


def _find_in_list(broker: redis.Redis, name: str, message_id: str) -> tuple[int, int] | None:
    """(index from the served end, length) of the message in one list, or None."""
    length = int(broker.llen(name))
    needle = message_id.encode()
    for start in range(0, length, SCAN_CHUNK):
        # From the served (right) end backwards: -1 is the next message out.
        chunk = broker.lrange(name, -(start + SCAN_CHUNK), -(start + 1))
        for offset, raw in enumerate(reversed(chunk)):
            data = raw if isinstance(raw, bytes) else raw.encode()
            if needle in data and _task_id(data) == message_id:
                return start + offset, length
    return None


def find(broker: redis.Redis, queues: list[str], message_id: str) -> QueuePosition | None:
    """The message's position in the first of `queues` that holds it, or None."""
    for queue in queues:
        ahead_in_higher = 0
        steps = priority_lists(queue)
        lengths = [int(broker.llen(name)) for name in steps]
        for name, length in zip(steps, lengths, strict=True):
            found = _find_in_list(broker, name, message_id)
            if found is not None:
                index, _ = found
                return QueuePosition(queue=queue, endpoint_id=keys.endpoint_id_of_queue(queue),
                                     ahead=ahead_in_higher + index, depth=sum(lengths))
            ahead_in_higher += length
    return None


def eta_s(ahead: int, figures: LiveFigures | None) -> float | None:
    """Seconds until a message with `ahead` messages before it is answered (None when the
    endpoint has no latency figures yet)."""
    if figures is None or not figures.p50_ms:
        return None
    per_s = max(figures.in_flight, 1) / (figures.p50_ms / 1000)
    return round((ahead + 1) / per_s, 3)


@lru_cache(maxsize=4)
def _broker(broker_url: str) -> redis.Redis:
    return broker_client(broker_url)


def ahead_of_new(broker: redis.Redis, queue: str, step: int) -> int:
    """Messages a message published now to `queue` at kombu priority step `step` has
    ahead of it: all of its own step's list and of the steps served before it."""
    pipe = broker.pipeline(transaction=False)
    for name in priority_lists(queue)[:step + 1]:
        pipe.llen(name)
    return sum(int(n) for n in pipe.execute())


def on_enqueue(broker_url: str, queue: str, priority: int) -> int | None:
    """`ahead_of_new` for a message of `priority` (0-9) on a Redis broker; None on another
    broker, or when the broker cannot be read (a position is not worth failing for)."""
    if not broker_url.startswith(("redis://", "rediss://", "unix://")):
        return None
    try:
        return ahead_of_new(_broker(broker_url), queue, broker_priority(priority, broker_url))
    except redis.RedisError as exc:
        logger.warning("queue_position.unread", extra={"queue": queue, "error": repr(exc)})
        return None
