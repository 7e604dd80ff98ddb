"""The call journal: a finished call's outcome and cost, kept in Redis before it is settled.

Written right after the provider answers (or fails) and before the charge is settled,
under the call key it is charged under, so a task redelivered after a kill settles and
returns the answer it already paid for (or repeats the fallback decision) instead of
calling again, and the reaper charges a finished call its actual usage.

An entry is {"completion": {...}, "cost_nusd": n} for an answer, or
{"error": {...}, "cost_nusd": 0} for a failed call.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from typing import Any

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


def queue_record_failure(batch: Batch, call_key: str, error: dict[str, Any]) -> None:
    """Queue keeping a failed call's error (a redelivery repeats its decision)."""
    ttl_s = int(get_settings().reservation_timeout_s) + 86400
    batch.call("SET", keys.call_journal(call_key),
               json.dumps({"error": error, "cost_nusd": 0}), "EX", ttl_s)


@dataclass(frozen=True, slots=True)
class Entry:
    """A journal entry: the completion, or the error of a failed call; its cost."""

    completion: Completion | None
    cost_nusd: int
    error: dict[str, Any] | None = None


def parse(raw: str | bytes) -> Entry:
    """A journal entry from its stored JSON."""
    entry = json.loads(raw)
    if "completion" in entry:
        return Entry(Completion(**entry["completion"]), int(entry["cost_nusd"]))
    return Entry(None, 0, dict(entry.get("error") or {}))


def usage_of(call_key: str) -> tuple[int, int] | None:
    """(tokens, nano-USD) the journal says the call used (0, 0 for a failed call), or
    None when there is no entry."""
    raw = run(lambda batch: _queue_get(batch, call_key))
    if raw is None:
        return None
    entry = parse(raw)
    if entry.completion is None:
        return 0, 0
    done = entry.completion
    return done.input_tokens + done.output_tokens, entry.cost_nusd


def _queue_get(batch: Batch, call_key: str) -> Reader[Any]:
    index = batch.call("GET", keys.call_journal(call_key))
    return lambda: batch[index]


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
        entry = parse(raw)
        if entry.completion is None:
            return None
        return entry.completion, entry.cost_nusd

    return read


def lookup(call_key: str) -> Journalled:
    """The journalled completion and cost of a call, if it finished."""
    return run(lambda batch: queue_lookup(batch, call_key))
