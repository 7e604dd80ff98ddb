"""The durable record of accepted messages, in Postgres: what the reconciler re-publishes.

A message is recorded when a producer accepts it (`RouteTask.apply_async`, under
`submit()` and the ingress): one INSERT before it is published, so a broker that loses it
(a Redis restart without AOF, a worker killed between its BRPOP and its unacked record)
cannot lose it for good. Its state moves

    accepted ──(its routing task starts)──▶ seen ──(a result is stored)──▶ finished

and the reconciler (`delivery/reconciler.py`) re-publishes the ones that stay quiet.

Costs, measured here: the INSERT commits without waiting for the WAL flush
(synchronous_commit=off, 0.25 ms instead of ~5 ms): a Postgres crash may drop the last
fraction of a second of records, which matters only if the broker loses the same messages
at the same moment. The two marks are a Redis SADD each, riding a round trip the path
makes anyway, moved to Postgres in batches by the reconciler: a mark lost with Redis (or
with a killed process, for a deferred one) only makes the reconciler look again at a
message that did not need it, which is safe (a message with a stored result is only marked
finished, and a duplicate of a message is the same message: its hand-off
record, call-key lease and journal make it one call and one charge).

The message is stored whole, prompt included, because the row is its only copy once the
broker lost it; it is cleared when the message finishes, and finished rows are deleted
after a day. Off with AIMESH_ACCEPTED_LOG=false, and always off in embedded mode (its
in-process broker and worker live and die together).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from psycopg.types.json import Jsonb
from sqlalchemy import Table, delete, null, select, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.exc import SQLAlchemyError

from aimesh_tasks import keys, redis_batch
from aimesh_tasks.db.engine import autocommit_connection, get_engine, get_relaxed_engine
from aimesh_tasks.db.models import AcceptedMessageRow
from aimesh_tasks.messages import AiMessage
from aimesh_tasks.redis_batch import Batch
from aimesh_tasks.redis_client import get_redis
from aimesh_tasks.settings import get_settings

logger = logging.getLogger(__name__)
TABLE: Table = AcceptedMessageRow.__table__  # type: ignore[assignment]
MARK_BATCH = 1000
# Built once: the INSERT of `record`, by dialect (a second record of an id inserts nothing).
_INSERT = {name: insert(TABLE).on_conflict_do_nothing(index_elements=["message_id"])
           .returning(TABLE.c.message_id)
           for name, insert in (("postgresql", pg_insert), ("sqlite", sqlite_insert))}
_INSERT_PG = (f"INSERT INTO {TABLE.name} (message_id, agent_id, state, message, republished, "
              "accepted_at, updated_at) VALUES (%(message_id)s, %(agent_id)s, %(state)s, "
              "%(message)s, %(republished)s, %(accepted_at)s, %(updated_at)s) "
              "ON CONFLICT (message_id) DO NOTHING RETURNING message_id")


def enabled() -> bool:
    """The record is kept (AIMESH_ACCEPTED_LOG, and not in embedded mode)."""
    settings = get_settings()
    return settings.accepted_log and not settings.embedded


def _now() -> datetime:
    return datetime.now(UTC)


def record(message: AiMessage) -> bool:
    """Record an accepted message; True if this call inserted its row (a second record of
    the same id changes nothing). False, with one log line, when Postgres is unreachable:
    the message is then published without a record (refusing it would turn a database
    outage into an outage for every producer)."""
    now = _now()
    row = {"message_id": message.id, "agent_id": message.agent_id, "state": "accepted",
           "message": message.to_json_dict(), "republished": 0, "accepted_at": now,
           "updated_at": now}
    engine = get_relaxed_engine()
    try:
        if engine.dialect.name == "postgresql":
            inserted = _insert_pg(row)
        else:
            with engine.begin() as connection:
                inserted = connection.execute(_INSERT[engine.dialect.name], row).first()
    except SQLAlchemyError as exc:
        logger.warning("accepted.unrecorded", extra={
            "message_id": message.id, "error": type(exc).__name__})
        return False
    return inserted is not None


def _insert_pg(row: dict[str, Any]) -> Any:
    """The INSERT of `record` on Postgres, through a pooled psycopg connection whose commits
    do not wait for the flush: paced one message at a time, 0.68 ms against the relaxed
    engine's 1.19 (p50 here; SQLAlchemy's execute of the compiled INSERT was the rest), on
    every producer's path before the publish."""
    with autocommit_connection(relaxed=True) as connection:
        return connection.execute(_INSERT_PG, {**row, "message": Jsonb(row["message"])}
                                  ).fetchone()


def forget(message_id: str) -> None:
    """Drop the record of a message whose publish failed (its producer got the error)."""
    try:
        with get_relaxed_engine().begin() as connection:
            connection.execute(delete(TABLE).where(TABLE.c.message_id == message_id,
                                                   TABLE.c.state == "accepted"))
    except SQLAlchemyError:
        logger.warning("accepted.forget_failed", extra={"message_id": message_id})


def queue_seen(batch: Batch, message_id: str) -> None:
    """The message's routing task started (applied to Postgres by `apply_marks`), queued
    on the routing task's first Redis round trip rather than a round trip of its own."""
    batch.call("SADD", keys.accepted_seen(), message_id)


def note_finished(message_id: str) -> None:
    """A result was stored for the message (applied to Postgres by `apply_marks`). The
    mark rides the process's next Redis batch (`redis_batch.defer`): it follows the
    result's store, and a mark lost meanwhile (the process killed) costs the reconciler
    one look at the result backend, which finds the result and only marks it finished."""
    redis_batch.defer("SADD", keys.accepted_finished(), message_id)


def _drain(key: str, apply: Any) -> int:
    """Pop marks off a Redis set in batches and apply each batch; a batch whose update
    fails goes back to the set."""
    client = get_redis()
    moved = 0
    while True:
        ids = [str(i) for i in client.spop(key, MARK_BATCH) or []]
        if not ids:
            return moved
        try:
            apply(ids)
        except SQLAlchemyError:
            client.sadd(key, *ids)
            raise
        moved += len(ids)


def _apply_seen(ids: list[str]) -> None:
    # A message seen again (a routing task that waited in the queue for a rate limit's
    # slot and started again) restarts its quiet time: it is alive, not lost.
    with get_engine().begin() as connection:
        connection.execute(update(TABLE).where(
            TABLE.c.message_id.in_(ids), TABLE.c.state.in_(("accepted", "seen"))
        ).values(state="seen", updated_at=_now()))


def mark_finished(ids: list[str]) -> None:
    """Note that these messages finished; their stored message is cleared."""
    now = _now()
    with get_engine().begin() as connection:
        connection.execute(update(TABLE).where(
            TABLE.c.message_id.in_(ids), TABLE.c.state != "finished"
        ).values(state="finished", message=null(), updated_at=now, finished_at=now))


def apply_marks() -> tuple[int, int]:
    """Move the seen and finished marks from Redis to Postgres: (seen, finished). Finished
    first: most messages finish within one pass, and their seen marks then match no row
    (one row write per message instead of two). This process's deferred marks go first."""
    redis_batch.flush_deferred()
    finished = _drain(keys.accepted_finished(), mark_finished)
    return _drain(keys.accepted_seen(), _apply_seen), finished


@dataclass(frozen=True, slots=True)
class Quiet:
    """An unfinished message that has been quiet too long."""

    message_id: str
    state: str
    message: dict[str, Any]
    republished: int


def quiet(accepted_for_s: float, seen_for_s: float, limit: int) -> list[Quiet]:
    """Unfinished messages, oldest first: accepted and not seen for `accepted_for_s`, or
    seen and not finished for `seen_for_s`."""
    now = _now()
    waiting = (TABLE.c.state == "accepted") & (
        TABLE.c.updated_at < now - timedelta(seconds=accepted_for_s))
    stalled = (TABLE.c.state == "seen") & (
        TABLE.c.updated_at < now - timedelta(seconds=seen_for_s))
    query = (select(TABLE.c.message_id, TABLE.c.state, TABLE.c.message, TABLE.c.republished)
             .where(waiting | stalled).order_by(TABLE.c.updated_at).limit(limit))
    with get_engine().connect() as connection:
        return [Quiet(r.message_id, r.state, r.message or {}, r.republished)
                for r in connection.execute(query)]


def mark_republished(ids: list[str]) -> None:
    """Note that these messages were published again: accepted anew, counted."""
    with get_engine().begin() as connection:
        connection.execute(update(TABLE).where(
            TABLE.c.message_id.in_(ids), TABLE.c.state != "finished"
        ).values(state="accepted", updated_at=_now(), republished=TABLE.c.republished + 1))


def purge(older_than_s: float) -> int:
    """Delete finished records older than `older_than_s`; how many."""
    cutoff = _now() - timedelta(seconds=older_than_s)
    with get_engine().begin() as connection:
        done = connection.execute(delete(TABLE).where(
            TABLE.c.state == "finished", TABLE.c.updated_at < cutoff))
    return int(done.rowcount or 0)
