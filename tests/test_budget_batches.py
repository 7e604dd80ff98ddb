"""Budget batches in Postgres (budget_apply, aimesh_tasks/budgets/pg_batch.py): what one
batch decides, and what a batch whose connection is killed half-way leaves (nothing).

Real Postgres; no workers. Batches are applied directly (pg_batch.apply) where a test
needs to know exactly what one batch holds, and through the group commit otherwise.
"""

from __future__ import annotations

import re
import threading
import uuid
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from datetime import timedelta
from typing import Any

import psycopg
import pytest
from sqlalchemy import select, text
from sqlalchemy.exc import OperationalError

from aimesh_tasks.budgets import get_budget, set_budget
from aimesh_tasks.budgets import pg_batch as pg
from aimesh_tasks.budgets.estimate import Estimate
from aimesh_tasks.budgets.ledger import Held, claim, release, reserve, settle
from aimesh_tasks.budgets.reaper import forget_old
from aimesh_tasks.db import (
    LedgerRow,
    ReservationRow,
    dispose_engines,
    get_engine,
    session_scope,
)
from aimesh_tasks.errors import BudgetExceeded
from aimesh_tasks.governance.agents import add_agent
from aimesh_tasks.messages import utcnow
from aimesh_tasks.pipeline import journal
from aimesh_tasks.settings import get_settings, reset_settings
from tests.budget_checks import assert_budget_invariants, blocked_batches, budget_row_locked
from tests.waits import wait_until

pytestmark = pytest.mark.usefixtures("clean")


def _agent(tokens: int) -> str:
    agent_id = f"batch-{uuid.uuid4().hex[:6]}"
    add_agent(agent_id)
    set_budget(agent_id, tokens=tokens)
    return agent_id


def _reserve(agent_id: str, call_key: str, tokens: int) -> pg.ReserveOp:
    return pg.ReserveOp(op="reserve", call_key=call_key, agent_id=agent_id,
                        message_id=call_key, endpoint_id="ep", tokens=tokens, nusd=0)


def _settle(call_key: str, tokens: int) -> pg.SettleOp:
    return pg.SettleOp(op="settle", call_key=call_key, tokens=tokens, nusd=0, kind="call")


def _claim(call_key: str) -> pg.ClaimOp:
    return pg.ClaimOp(op="claim", call_key=call_key)


def _reservations(agent_id: str) -> dict[str, str]:
    with session_scope() as session:
        return dict(session.execute(select(ReservationRow.call_key, ReservationRow.state)
                                    .where(ReservationRow.agent_id == agent_id)).all())


def test_one_batch_admits_in_arrival_order_and_a_later_smaller_call_still_fits() -> None:
    agent = _agent(tokens=250)
    outcomes = pg.apply([_reserve(agent, "k1", 100), _reserve(agent, "k2", 200),
                         _reserve(agent, "k3", 100), _reserve(agent, "k4", 50),
                         _reserve(agent, "k5", 1)])
    assert [o["outcome"] for o in outcomes] == ["reserved", "denied", "reserved", "reserved",
                                                "denied"]
    # each refusal is decided on the budget as the earlier operations left it
    assert outcomes[1]["reason"] == "exhausted"
    assert outcomes[1]["standing"]["reserved_tokens"] == 100
    assert outcomes[4]["standing"]["reserved_tokens"] == 250
    assert get_budget(agent).reserved_tokens == 250
    assert _reservations(agent) == {"k1": "reserved", "k3": "reserved", "k4": "reserved"}


def test_a_batch_where_every_call_fits_reserves_them_all() -> None:
    agents = [_agent(tokens=1000) for _ in range(3)]
    ops = [_reserve(a, f"{a}:{n}", 100) for n in range(4) for a in agents]
    assert [o["outcome"] for o in pg.apply(ops)] == ["reserved"] * 12
    assert [get_budget(a).reserved_tokens for a in agents] == [400, 400, 400]


def test_a_batch_naming_one_call_key_again_applies_its_operations_in_order() -> None:
    agent = _agent(tokens=1000)
    outcomes = pg.apply([_reserve(agent, "k", 100), _reserve(agent, "k", 100), _claim("k"),
                         _claim("k"), _settle("k", 60), _settle("k", 60), _claim("k")])
    assert [o["outcome"] for o in outcomes] == ["reserved", "held", "claimed",
                                                "called_before", "settled", "closed",
                                                "settled"]
    assert outcomes[1]["state"] == "reserved" and outcomes[1]["tokens"] == 100
    budget = get_budget(agent)
    assert (budget.spent_tokens, budget.reserved_tokens) == (60, 0)
    assert_budget_invariants()


def test_claim_and_settle_say_what_they_found() -> None:
    agent = _agent(tokens=1000)
    pg.apply([_reserve(agent, "gone", 10), _reserve(agent, "done", 10)])
    assert release("gone") is True
    pg.apply([_claim("done"), _settle("done", 7)])
    outcomes = pg.apply([_claim("missing"), _claim("gone"), _claim("done"),
                         _settle("gone", 5), _settle("missing", 5), _reserve(agent, "done", 10)])
    assert [o["outcome"] for o in outcomes] == ["missing", "released", "settled", "closed",
                                                "closed", "held"]
    assert outcomes[5]["state"] == "settled"
    with session_scope() as session:
        charged = list(session.scalars(select(LedgerRow.tokens)
                                       .where(LedgerRow.agent_id == agent)))
    assert charged == [7]
    assert_budget_invariants()


def test_settle_reports_what_is_left_after_every_settlement_of_the_batch() -> None:
    agent = _agent(tokens=1000)
    pg.apply([_reserve(agent, "a", 100), _reserve(agent, "b", 100)])
    outcomes = pg.apply([_settle("a", 30), _settle("b", 20)])
    assert [(o["outcome"], o["agent_id"], o["tokens_left"]) for o in outcomes] == [
        ("settled", agent, 950), ("settled", agent, 950)]
    assert outcomes[0]["nusd_left"] is None  # no money limit
    assert_budget_invariants()


def test_an_expired_budget_is_refused_in_a_batch() -> None:
    agent = _agent(tokens=1000)
    with get_engine().begin() as connection:
        connection.execute(text("UPDATE budgets SET expires_at = now() - interval '1 second' "
                                "WHERE agent_id = :a"), {"a": agent})
    with pytest.raises(BudgetExceeded, match="has expired"):
        reserve(agent, "m", "ep", "m:0", Estimate(10, 10, 0))
    assert _reservations(agent) == {}


@pytest.fixture()
def patient_locks(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Statements wait for row locks as long as the test needs (not 5 s, and no 30 s
    statement timeout), so a slow machine cannot end a wait before the test does."""
    monkeypatch.setenv("AIMESH_DB_LOCK_TIMEOUT_S", "0")
    monkeypatch.setenv("AIMESH_DB_STATEMENT_TIMEOUT_S", "0")
    reset_settings()
    dispose_engines()
    yield
    monkeypatch.undo()
    reset_settings()
    dispose_engines()


def _terminate(pid: int) -> None:
    with get_engine().connect() as connection:
        assert connection.execute(text("SELECT pg_terminate_backend(:p)"), {"p": pid}).scalar()


def _queued(n: int) -> bool:
    return len(pg._group()._queue) == n


def test_a_batch_whose_connection_is_killed_mid_batch_applies_nothing_and_its_callers_fail(
        patient_locks: None) -> None:
    """The writer is killed mid-batch: its connection ends while the batch waits, inside
    Postgres, for a budget row another transaction holds. Nothing of that batch is
    applied and every caller in it gets a transient error (its task would retry), while
    a batch beside it and the operations queued behind go on; a retry reserves once."""
    assert pg.PARALLEL_BATCHES == 2, "this test lays out two batches in flight"
    agent = _agent(tokens=10_000)
    need = Estimate(50, 50, 0)
    # A second batch goes beside the first once OVERLAP_AT reservations wait for it.
    first_n, beside_ns = 1, range(2, 2 + pg.OVERLAP_AT)
    behind_ns = range(beside_ns.stop, beside_ns.stop + 2)

    def start(n: int) -> Future[Any]:
        return pool.submit(reserve, agent, f"m{n}", "ep", f"m{n}:0", need)

    def blocked(count: int) -> dict[int, str] | None:
        found = blocked_batches()
        return found if len(found) == count else None

    with ThreadPoolExecutor(4 + pg.OVERLAP_AT) as pool, budget_row_locked(agent):
        first = start(first_n)
        killed = set(wait_until(lambda: blocked(1), "the first batch waiting for the row"))
        beside = [start(n) for n in beside_ns]
        waiting = set(wait_until(lambda: blocked(2), "a second batch beside it"))
        behind = [start(n) for n in behind_ns]
        wait_until(lambda: _queued(2), "two reservations queued behind both batches")
        _terminate(dead := killed.pop())
        with pytest.raises(OperationalError):
            first.result(60)

        def merged_batch() -> set[int] | None:  # the killed backend may linger as it exits
            found = set(blocked_batches()) - {dead}
            return found - waiting if len(found) == 2 else None

        # its lead passed on: one batch now holds both queued reservations; kill it too
        merged = wait_until(merged_batch, "the queued reservations' batch waiting for the row")
        _terminate(merged.pop())
        for future in behind:
            with pytest.raises(OperationalError):
                future.result(60)
    # the lock is gone: the batch beside went through
    assert all(future.result(60) is not None for future in beside)
    assert _reservations(agent) == {f"m{n}:0": "reserved" for n in beside_ns}
    assert get_budget(agent).reserved_tokens == 100 * len(beside_ns)
    everyone = [first_n, *beside_ns, *behind_ns]
    for n in [first_n, *behind_ns]:  # the tasks' retries
        assert reserve(agent, f"m{n}", "ep", f"m{n}:0", need) is not None
    for n in beside_ns:  # a redelivery: held
        assert reserve(agent, f"m{n}", "ep", f"m{n}:0", need) is not None
    assert get_budget(agent).reserved_tokens == 100 * len(everyone)
    for n in everyone:
        assert claim(f"m{n}:0") == "claimed"
        assert settle(f"m{n}:0", 60, 0) is True
    assert get_budget(agent).spent_tokens == 60 * len(everyone)
    assert_budget_invariants()


def test_concurrent_callers_share_batches_and_never_overspend() -> None:
    """Many threads reserve, claim and settle against one small budget at once: what is
    admitted never exceeds it, and every refusal was right when it was made."""
    agent = _agent(tokens=2_000)
    need = Estimate(50, 50, 0)
    denied: list[BudgetExceeded] = []
    lock = threading.Lock()

    def cycle(n: int) -> None:
        key = f"c{n}:0"
        try:
            reserve(agent, f"c{n}", "ep", key, need)
        except BudgetExceeded as exc:
            with lock:
                denied.append(exc)
            return
        assert claim(key) == "claimed"
        assert settle(key, 100, 0) is True

    with ThreadPoolExecutor(16) as pool:
        list(pool.map(cycle, range(60)))
    budget = get_budget(agent)
    assert budget.spent_tokens == (60 - len(denied)) * 100 == 2_000
    for exc in denied:  # refused only when what was left could not cover it
        assert exc.fields["left_tokens"] < exc.fields["needed_tokens"]
    assert_budget_invariants()


# How budget_apply's statement for each kind of operation begins (migration 0010).
_STATEMENT_OF = {"reserve": "WITH q AS", "claim": "WITH c AS", "settle": "WITH s AS"}


def _rows_removed_by_filter(connection: psycopg.Connection[Any], ops: list[pg.Op]
                            ) -> tuple[list[pg.Outcome], list[int]]:
    """Apply `ops` on `connection` with every statement inside budget_apply explained as
    it runs (auto_explain, ANALYZE): the outcomes, and every plan node's count of rows it
    read and threw away (a node that threw none away prints no count)."""
    notes: list[str] = []
    connection.add_notice_handler(lambda diag: notes.append(diag.message_primary or ""))
    for setting in ("LOAD 'auto_explain'", "SET auto_explain.log_min_duration = 0",
                    "SET auto_explain.log_nested_statements = on",
                    "SET auto_explain.log_analyze = on", "SET auto_explain.log_level = notice"):
        connection.execute(setting)
    outcomes = pg._apply_run(connection, ops)
    statement = _STATEMENT_OF[ops[0]["op"]]
    assert any(f"Query Text: {statement}" in note for note in notes), notes  # it was explained
    removed = [int(n) for note in notes
               for n in re.findall(r"Rows Removed by (?:Join )?Filter: (\d+)", note)]
    return outcomes, removed


def test_a_connection_that_planned_its_batches_on_empty_tables_reads_only_its_own_calls(
) -> None:
    """budget_apply's plans are generic and kept by each connection from its first batch
    (migration 0015). Planned while the tables were empty, the claim's and the settle's
    UPDATE once scanned every reservation ever made, for every batch, for the life of the
    connection: they must find a batch's reservations by their keys whatever the
    statistics said when they were planned."""
    agent = _agent(tokens=10**9)
    with psycopg.connect(get_settings().database_url, autocommit=True) as connection:
        # this connection's plans, made on empty tables (the clean fixture emptied them)
        assert [o["outcome"] for o in pg._apply_run(connection, [_reserve(agent, "first", 1)])
                ] == ["reserved"]
        pg._apply_run(connection, [_claim("first")])
        pg._apply_run(connection, [_settle("first", 1)])
        with get_engine().begin() as other:  # the tables grow: 2,000 agents and calls
            other.execute(text(
                "INSERT INTO agents (id, description, enabled) SELECT 'many-' || g, '', true "
                "FROM generate_series(1, 2000) g"))
            other.execute(text(
                "INSERT INTO budgets (agent_id, token_limit, period, period_start, spent_tokens,"
                " spent_nusd, reserved_tokens, reserved_nusd, updated_at) SELECT 'many-' || g,"
                " 1000, 'none', now(), 0, 0, 0, 0, now() FROM generate_series(1, 2000) g"))
            other.execute(text(
                "INSERT INTO budget_reservations (call_key, agent_id, message_id, endpoint_id,"
                " tokens, nusd, state, created_at, closed_at) SELECT 'old-' || g, :a, "
                "'old-' || g, 'ep', 1, 0, 'settled', now(), now() "
                "FROM generate_series(1, 2000) g"), {"a": agent})
            other.execute(text(  # and their charges
                "INSERT INTO budget_ledger (call_key, agent_id, message_id, endpoint_id, "
                "tokens, nusd, kind, created_at) SELECT 'old-' || g, :a, 'old-' || g, 'ep', "
                "1, 0, 'call', now() FROM generate_series(1, 2000) g"), {"a": agent})
            other.execute(text("UPDATE budgets SET spent_tokens = spent_tokens + 2000 "
                               "WHERE agent_id = :a"), {"a": agent})
        for op, outcome in ((_reserve(agent, "new", 1), "reserved"), (_claim("new"), "claimed"),
                            (_settle("new", 1), "settled")):
            outcomes, removed = _rows_removed_by_filter(connection, [op])
            assert outcomes[0]["outcome"] == outcome
            assert max(removed, default=0) < 10, (op["op"], removed)
    assert _reservations(agent)["new"] == "settled"
    assert_budget_invariants()


def test_closed_reservations_are_deleted_after_the_journals_retention_their_charges_stay(
) -> None:
    """A reservation closed (settled or released) longer ago than the journal keeps its
    call is deleted (migration 0016): no delivery of that call comes any more, and the
    table every cycle writes stays the size of that window. An open one stays however
    old (the reaper decides it), and so does every ledger row."""
    agent = _agent(tokens=10_000)
    for key in ("settled-old", "released-old", "open-old", "settled-new"):
        reserve(agent, key, "ep", key, Estimate(10, 10, 0))
    assert settle("settled-old", 7, 0) and settle("settled-new", 5, 0)
    assert release("released-old")
    past = utcnow() - timedelta(seconds=journal.retention_s() + 60)
    with get_engine().begin() as connection:
        connection.execute(text(
            "UPDATE budget_reservations SET created_at = :past, closed_at = CASE WHEN "
            "state <> 'reserved' THEN :past END WHERE call_key LIKE '%-old'"), {"past": past})
    assert forget_old() == 2
    assert _reservations(agent) == {"open-old": "reserved", "settled-new": "settled"}
    assert forget_old() == 0
    with session_scope() as session:
        charged = dict(session.execute(select(LedgerRow.call_key, LedgerRow.tokens)
                                       .where(LedgerRow.agent_id == agent)).all())
    assert charged == {"settled-old": 7, "settled-new": 5}
    budget = get_budget(agent)
    assert (budget.spent_tokens, budget.reserved_tokens) == (12, 20)
    assert release("open-old")
    assert_budget_invariants()


@pytest.mark.parametrize("batched", [True, False], ids=["batch", "general path"])
def test_a_charged_call_key_whose_reservation_was_deleted_is_found_in_the_ledger(
        batched: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """After forget_closed, the ledger row alone says a call key was charged: reserving
    it again holds it as settled (at what was charged) and its claim finds it settled,
    as while the reservation was kept, so the caller calls under a new key and the
    ledger never gets a second row for one key (its unique constraint would fail the
    whole batch). On SQLite every operation takes the general path; here it is forced."""
    if not batched:
        monkeypatch.setattr(pg, "available", lambda: False)
    agent = _agent(tokens=10_000)
    need = Estimate(10, 10, 0)
    reserve(agent, "m", "ep", "m:0", need)
    assert claim("m:0") == "claimed" and settle("m:0", 7, 0)
    with get_engine().begin() as connection:
        connection.execute(text("DELETE FROM budget_reservations WHERE call_key = 'm:0'"))
    assert reserve(agent, "m", "ep", "m:0", need) == Held("m:0", 7, 0, "settled")
    assert claim("m:0") == "settled"
    assert settle("m:0", 7, 0) is False
    assert claim("never") == "missing"
    assert _reservations(agent) == {}
    budget = get_budget(agent)
    assert (budget.spent_tokens, budget.reserved_tokens) == (7, 0)
    assert_budget_invariants()
