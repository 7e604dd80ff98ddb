"""How often a task message was delivered, and which deliveries lost their worker (Redis).

Only redeliveries are counted (the broker marks them): a message delivered once costs no
round trip, so the counter adds nothing to the message path. The keys expire a day after
the last write, or after enough visibility timeouts for every allowed redelivery.
"""

from __future__ import annotations

import json
import time
from typing import Any

from aimesh_tasks import keys
from aimesh_tasks.redis_client import get_redis
from aimesh_tasks.settings import get_settings

HISTORY_LIMIT = 50


def _ttl_s() -> int:
    settings = get_settings()
    return max(86400, settings.visibility_timeout_s * (settings.max_deliveries + 1))


def count_redelivery(task_id: str) -> int:
    """Count one more redelivery of `task_id`; its deliveries so far, the first included."""
    with get_redis().pipeline(transaction=False) as pipe:
        pipe.incr(keys.deliveries(task_id))
        pipe.expire(keys.deliveries(task_id), _ttl_s())
        redeliveries = int(pipe.execute()[0])
    return redeliveries + 1


def record_lost_worker(task_id: str, worker: str, error: str) -> None:
    """Note that a delivery of `task_id` ended with its worker process gone."""
    entry = {"at": time.time(), "worker": worker, "error": error[:300]}
    with get_redis().pipeline(transaction=False) as pipe:
        pipe.rpush(keys.delivery_history(task_id), json.dumps(entry))
        pipe.ltrim(keys.delivery_history(task_id), -HISTORY_LIMIT, -1)
        pipe.expire(keys.delivery_history(task_id), _ttl_s())
        pipe.execute()


def history(task_id: str) -> list[dict[str, Any]]:
    """The deliveries of `task_id` that lost their worker, oldest first."""
    return [json.loads(item) for item in get_redis().lrange(keys.delivery_history(task_id),
                                                            0, -1)]
