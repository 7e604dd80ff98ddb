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
from aimesh_tasks.redis_batch import Batch, Reader, run, send
from aimesh_tasks.settings import get_settings


def queue_record(batch: Batch, call_key: str, completion: Completion, cost_nusd: int) -> None:
    """Queue keeping the completion and its cost, long enough for any redelivery or
    reaper run."""
    ttl_s = int(get_settings().reservation_timeout_s) + 86400
    entry = {"completion": asdict(completion), "cost_nusd": cost_nusd}
    batch.call("SET", keys.call_journal(call_key), json.dumps(entry), "EX", ttl_s)


def record(call_key: str, completion: Completion, cost_nusd: int) -> None:
    """Keep the completion and its cost (see queue_record)."""
    send(lambda batch: queue_record(batch, call_key, completion, cost_nusd))


Journalled = tuple[Completion, int] | None


def queue_lookup(batch: Batch, call_key: str) -> Reader[Journalled]:
    """Queue `lookup` on a batch."""
    index = batch.call("GET", keys.call_journal(call_key))

    def read() -> Journalled:
        raw = batch[index]
        if raw is None:
            return None
        entry = json.loads(raw)
        return Completion(**entry["completion"]), int(entry["cost_nusd"])

    return read


def lookup(call_key: str) -> Journalled:
    """The journalled completion and cost of a call, if it finished."""
    return run(lambda batch: queue_lookup(batch, call_key))
