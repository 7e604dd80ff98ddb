"""The Redis outbox: records reach Postgres once, however often a batch is flushed."""

from __future__ import annotations

import json

import pytest
from sqlalchemy import func, select

from aimesh_tasks import keys, outbox
from aimesh_tasks.db import RoutingDecisionRow, session_scope
from aimesh_tasks.messages import utcnow
from aimesh_tasks.observability.exporter import ClusterCollector, broker_client
from aimesh_tasks.redis_client import get_redis
from aimesh_tasks.settings import get_settings

pytestmark = pytest.mark.usefixtures("clean")


def _decision(message_id: str) -> dict[str, object]:
    return {"message_id": message_id, "agent_id": "a", "winner": "e", "fallbacks": [],
            "candidates": [], "excluded": {}, "weights": {}, "error": None,
            "created_at": utcnow()}


def _count(message_id: str) -> int:
    with session_scope() as session:
        return int(session.scalar(select(func.count()).select_from(RoutingDecisionRow)
                                  .where(RoutingDecisionRow.message_id == message_id)) or 0)


def test_records_wait_in_redis_until_flushed() -> None:
    # The session's workers flush the same outbox every second: hold the flushers' lock so
    # that none moves the record while the test looks at it waiting in Redis.
    get_redis().set(keys.outbox_lock(), "held-by-test", px=30_000)
    try:
        outbox.append("routing_decision", _decision("m-1"))
        assert outbox.pending() == 1 and _count("m-1") == 0
        assert outbox.flush() == 0  # the lock is held: nothing moves
    finally:
        get_redis().delete(keys.outbox_lock())
    outbox.flush(wait_s=5)  # this process or a worker's flusher moves it, once
    assert outbox.pending() == 0 and _count("m-1") == 1


def test_a_batch_inserted_twice_lands_once() -> None:
    outbox.append("routing_decision", _decision("m-2"))
    [raw] = get_redis().lrange(keys.outbox(), 0, -1)
    get_redis().rpush(keys.outbox(), raw)  # as if a flusher died between insert and trim
    assert outbox.flush() == 2
    assert _count("m-2") == 1
    assert json.loads(raw)["row"]["row_key"]


def test_a_held_lock_means_another_flusher_is_at_work() -> None:
    outbox.append("routing_decision", _decision("m-3"))
    get_redis().set(keys.outbox_lock(), "someone-else", px=5000)
    assert outbox.flush() == 0 and outbox.pending() == 1
    get_redis().delete(keys.outbox_lock())
    assert outbox.flush() == 1


def test_unknown_record_kind_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown outbox record kind 'audit-x'"):
        outbox.append("audit-x", {})


def _rejected() -> list[dict[str, str]]:
    return [json.loads(item) for item in get_redis().lrange(keys.outbox_rejected(), 0, -1)]


def test_a_record_no_table_can_hold_is_set_aside_and_the_rest_land() -> None:
    """One bad record must not stop the flusher with every record behind it: the batch is
    retried record by record and what Postgres still refuses is kept with its reason."""
    too_long = "m-" + "x" * 200  # message_id is a String(128)
    outbox.append("routing_decision", _decision("m-4"))
    outbox.append("routing_decision", _decision(too_long))
    get_redis().rpush(keys.outbox(), json.dumps({"kind": "no-such-kind", "row": {}}))
    outbox.append("routing_decision", _decision("m-5"))
    outbox.flush(wait_s=5)
    assert outbox.pending() == 0
    assert _count("m-4") == 1 and _count("m-5") == 1 and _count(too_long) == 0
    too_long_kept, unknown_kept = sorted(_rejected(), key=lambda r: "unknown" in r["reason"])
    assert json.loads(too_long_kept["record"])["row"]["message_id"] == too_long
    assert "too long" in too_long_kept["reason"]
    # A kind this version does not know (a newer version's, mid-upgrade) is kept, not lost.
    assert json.loads(unknown_kept["record"]) == {"kind": "no-such-kind", "row": {}}
    assert "unknown record kind 'no-such-kind'" in unknown_kept["reason"]
    # The exporter shows what was set aside (an operator's alert) and what waits; the
    # flushers' lock is held so that the waiting record stays put while it is scraped.
    get_redis().set(keys.outbox_lock(), "held-by-test", px=30_000)
    try:
        outbox.append("routing_decision", _decision("m-8"))
        scraped = {(s.name, s.labels.get("state")): s.value
                   for family in ClusterCollector(broker_client(get_settings().broker_url))
                   .collect() for s in family.samples}
    finally:
        get_redis().delete(keys.outbox_lock())
    assert scraped[("aimesh_outbox_records", "rejected")] == 2
    assert scraped[("aimesh_outbox_records", "waiting")] == 1
    outbox.flush(wait_s=5)
    assert _count("m-8") == 1


def test_a_nul_character_is_kept_as_a_replacement_character() -> None:
    """Postgres text cannot hold NUL: the record lands with U+FFFD in its place (and a
    backslash before it in the text is kept as it was)."""
    decision = _decision("m-6")
    decision["error"] = "bad\x00byte \\u0000 literal"
    outbox.append("routing_decision", decision)
    outbox.flush(wait_s=5)
    with session_scope() as session:
        error = session.scalar(select(RoutingDecisionRow.error)
                               .where(RoutingDecisionRow.message_id == "m-6"))
    assert error == "bad\ufffdbyte \\u0000 literal"
    assert _rejected() == []


def test_a_record_missing_a_defaulted_column_gets_its_default() -> None:
    decision = _decision("m-7")
    del decision["fallbacks"], decision["weights"]
    outbox.append("routing_decision", decision)
    outbox.flush(wait_s=5)
    with session_scope() as session:
        row = session.scalars(select(RoutingDecisionRow)
                              .where(RoutingDecisionRow.message_id == "m-7")).one()
        assert row.fallbacks == [] and row.weights == {} and row.winner == "e"
        assert row.created_at.tzinfo is not None
