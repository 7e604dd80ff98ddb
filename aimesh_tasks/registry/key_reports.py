"""Which workers serve an endpoint without its API key: reported by the workers, shown
by `aimesh endpoints list` ("key missing on <worker>").

Per endpoint, a sorted set of worker names, each scored by when its report expires; the
follow step (aimesh_tasks/follow.py) refreshes its reports well within their TTL, so a
worker that stops reporting drops out.
"""

from __future__ import annotations

import time
from collections.abc import Iterable

from aimesh_tasks import keys
from aimesh_tasks.redis_batch import Batch


def report_missing_keys(worker: str, missing: Iterable[str], present: Iterable[str],
                        ttl_s: float) -> None:
    """Say which endpoints `worker` serves without their key (for `ttl_s`: a worker that
    stops reporting drops out) and which it has the key of again."""
    until = time.time() + ttl_s
    batch = Batch()
    for endpoint_id in missing:
        batch.call("ZADD", keys.key_missing(endpoint_id), until, worker)
        batch.call("EXPIRE", keys.key_missing(endpoint_id), int(ttl_s) + 1)
    for endpoint_id in present:
        batch.call("ZREM", keys.key_missing(endpoint_id), worker)
    batch.send()


def workers_missing_keys(endpoint_ids: Iterable[str]) -> dict[str, list[str]]:
    """For each endpoint, the workers that reported lately that they serve it without its
    key (one round trip)."""
    ids = list(endpoint_ids)
    batch = Batch()
    now = time.time()
    for endpoint_id in ids:
        batch.call("ZRANGEBYSCORE", keys.key_missing(endpoint_id), now, "+inf")
    batch.send()
    return {endpoint_id: sorted(_text(w) for w in batch[i]) for i, endpoint_id in enumerate(ids)}


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
