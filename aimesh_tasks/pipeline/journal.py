"""The call journal: a completed call's answer and cost, kept in Redis before it is settled.

Written right after the provider answers and before the charge is settled, so a task
redelivered after a kill settles and returns the answer it already paid for instead of
calling again, and the reaper charges a finished call its actual usage.
"""

from __future__ import annotations

import json
from dataclasses import asdict

from aimesh_tasks import keys
from aimesh_tasks.providers.base import Completion
from aimesh_tasks.redis_client import get_redis
from aimesh_tasks.settings import get_settings


def record(call_key: str, completion: Completion, cost_nusd: int) -> None:
    """Keep the completion and its cost, long enough for any redelivery or reaper run."""
    ttl_s = int(get_settings().reservation_timeout_s) + 86400
    entry = {"completion": asdict(completion), "cost_nusd": cost_nusd}
    get_redis().set(keys.call_journal(call_key), json.dumps(entry), ex=ttl_s)


def lookup(call_key: str) -> tuple[Completion, int] | None:
    """The journalled completion and cost of a call, if it finished."""
    raw = get_redis().get(keys.call_journal(call_key))
    if raw is None:
        return None
    entry = json.loads(raw)
    return Completion(**entry["completion"]), int(entry["cost_nusd"])
