"""How often a task message was delivered, and which deliveries lost their worker (Redis).

Only redeliveries are counted (the broker marks them): a message delivered once costs no
round trip, so the counter adds nothing to the message path. A delivery is counted when a
worker screens it on its way to the pool (delivery/request.py), so the count is of
deliveries that were, or were about to be, run: a message a worker held for its countdown
and gave back when it stopped was never screened, and is not counted. RabbitMQ's own
delivery limit counts every acquisition, those returns included; `put_back_unrun` says
when a message it dead-lettered should go back on its queue instead (rabbit/drain.py).
The keys expire a day after the last write, or after enough visibility timeouts for
every allowed redelivery.
"""

from __future__ import annotations

import json
import time
from typing import Any

from aimesh_tasks import keys
from aimesh_tasks.redis_client import get_redis
from aimesh_tasks.settings import get_settings

HISTORY_LIMIT = 50
# How often a message RabbitMQ gave up on, unrun, goes back on its queue before it is
# dead-lettered all the same (a worker that dies on receiving it, before any screening).
PUT_BACK_LIMIT = 3


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


def runs_at_most(task_id: str) -> int:
    """At most how many deliveries of `task_id` reached a worker's pool: the redeliveries
    screened, and the first delivery (never counted: taken to have run)."""
    return int(get_redis().get(keys.deliveries(task_id)) or 0) + 1


def put_back_unrun(runs: int, put_back: int, max_deliveries: int) -> bool:
    """Whether a message the broker dead-lettered after `max_deliveries` acquisitions goes
    back on its queue: fewer than `max_deliveries` of them reached a pool (`runs`, at most),
    so some were returns of a message no worker ran (held for its countdown by a worker
    that stopped), and it has been put back fewer than PUT_BACK_LIMIT times already."""
    return runs < max_deliveries and put_back < PUT_BACK_LIMIT


def count_put_back(task_id: str) -> int:
    """Count one more putting back of `task_id`; how many times, this one included. The
    copy put back is a new message, whose first delivery is not marked redelivered and so
    never screened: it is counted as a run here, taken to have run like any first one."""
    with get_redis().pipeline(transaction=False) as pipe:
        pipe.incr(keys.put_back(task_id))
        pipe.expire(keys.put_back(task_id), _ttl_s())
        pipe.incr(keys.deliveries(task_id))
        pipe.expire(keys.deliveries(task_id), _ttl_s())
        return int(pipe.execute()[0])


def put_back_so_far(task_id: str) -> int:
    """How many times `task_id` was put back on its queue unrun."""
    return int(get_redis().get(keys.put_back(task_id)) or 0)
