"""The call journal: a finished call's outcome and cost, kept in Redis before it is settled.

Written right after the provider answers (or fails) and before the charge is settled,
under the call key it is charged under, so a task redelivered after a kill settles and
returns the answer it already paid for (or repeats the fallback decision) instead of
calling again, and the reaper charges a finished call its actual usage. A metered call's
settlement keeps the same entry in Postgres (AIMESH_DURABLE_ANSWERS, pipeline/durable.py)
for a Redis that loses its data.

An entry (`EntryJson`) is {"completion": {...}, "cost_nusd": n} for an answer, or
{"error": {...}, "cost_nusd": 0} for a failed call. It is kept for `retention_s()`.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from typing import Any, NotRequired, TypedDict

from aimesh_tasks import keys
from aimesh_tasks.providers.base import Completion
from aimesh_tasks.redis_batch import Batch, Reader, run, send
from aimesh_tasks.settings import get_settings


class EntryJson(TypedDict):
    """A journal entry as stored: in Redis, and with the call's settlement in Postgres."""

    cost_nusd: int
    completion: NotRequired[dict[str, Any]]
    error: NotRequired[dict[str, Any]]


def retention_s() -> int:
    """How long an entry is kept: longer than any redelivery or reaper run."""
    return int(get_settings().reservation_timeout_s) + 86400


def answered(completion: Completion, cost_nusd: int) -> EntryJson:
    """The entry of a call that answered."""
    return {"completion": asdict(completion), "cost_nusd": cost_nusd}


def failed(error: dict[str, Any]) -> EntryJson:
    """The entry of a call that failed (a redelivery repeats its decision)."""
    return {"error": error, "cost_nusd": 0}


def queue_keep(batch: Batch, call_key: str, entry: EntryJson) -> None:
    """Queue keeping `entry` under the call key it is charged under."""
    batch.call("SET", keys.call_journal(call_key), json.dumps(entry), "EX", retention_s())


def queue_record_failure(batch: Batch, call_key: str, error: dict[str, Any]) -> None:
    """Queue keeping a failed call's error (a redelivery repeats its decision)."""
    queue_keep(batch, call_key, failed(error))


@dataclass(frozen=True, slots=True)
class Entry:
    """A journal entry: the completion, or the error of a failed call; its cost."""

    completion: Completion | None
    cost_nusd: int
    error: dict[str, Any] | None = None


def load(raw: str | bytes) -> EntryJson:
    """A journal entry's stored JSON, decoded."""
    entry: EntryJson = json.loads(raw)
    return entry


def parse(raw: str | bytes) -> Entry:
    """A journal entry from its stored JSON."""
    return from_json(load(raw))


def from_json(entry: EntryJson) -> Entry:
    """A journal entry from its decoded JSON."""
    if "completion" in entry:
        return Entry(Completion(**entry["completion"]), int(entry["cost_nusd"]))
    return Entry(None, 0, dict(entry.get("error") or {}))


def usage(entry: EntryJson) -> tuple[int, int]:
    """(tokens, nano-USD) the entry says the call used (0, 0 for a failed call)."""
    done = from_json(entry)
    if done.completion is None:
        return 0, 0
    return done.completion.input_tokens + done.completion.output_tokens, done.cost_nusd


def entry_of(call_key: str) -> EntryJson | None:
    """The journal entry of a call, or None when there is none."""
    raw = run(lambda batch: _queue_get(batch, call_key))
    return None if raw is None else load(raw)


def _queue_get(batch: Batch, call_key: str) -> Reader[Any]:
    index = batch.call("GET", keys.call_journal(call_key))
    return lambda: batch[index]


def record(call_key: str, completion: Completion, cost_nusd: int) -> None:
    """Keep the completion and its cost."""
    send(lambda batch: queue_keep(batch, call_key, answered(completion, cost_nusd)))


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
