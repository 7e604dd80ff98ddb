"""A batch of reservations alone commits without waiting for its WAL flush
(budgets/pg_batch.py): what that takes, and what a Postgres crash that takes such a
reservation back leaves behind.

The crash itself cannot be timed to land between a reservation's commit and its flush, so
the second half of this file makes what it leaves: the reservation's row gone and its hold
gone from the budget, as if neither had been written, after the message was routed and
handed off. The message path runs as plain functions on real Redis, Postgres and the
simulator; the simulator's call log is the truth about upstream calls.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import psycopg
import pytest
from sqlalchemy import text

from aimesh_tasks import keys
from aimesh_tasks.app import app
from aimesh_tasks.budgets import pg_batch as pg
from aimesh_tasks.budgets import set_budget
from aimesh_tasks.db import get_engine
from aimesh_tasks.envelope import Envelope
from aimesh_tasks.errors import BudgetExceeded
from aimesh_tasks.governance import add_agent
from aimesh_tasks.messages import AiMessage
from aimesh_tasks.pipeline import calling, routing
from aimesh_tasks.pipeline.outcomes import Done, Failed, HandOff
from aimesh_tasks.policies import Policies
from aimesh_tasks.policies.budget import BudgetAdmission
from aimesh_tasks.registry import Endpoint
from aimesh_tasks.settings import get_settings
from aimesh_tasks.simulator import RunningSimulator
from tests.budget_checks import assert_budget_invariants

pytestmark = pytest.mark.usefixtures("clean")
AGENT = "relaxed-agent"


def _reserve(call_key: str) -> pg.ReserveOp:
    return pg.ReserveOp(op="reserve", call_key=call_key, agent_id=AGENT, message_id=call_key,
                        endpoint_id="e", tokens=10, nusd=100)


def _claim(call_key: str) -> pg.ClaimOp:
    return pg.ClaimOp(op="claim", call_key=call_key)


def _settle(call_key: str) -> pg.SettleOp:
    return pg.SettleOp(op="settle", call_key=call_key, tokens=5, nusd=50, kind="call")


def _commit_setting(ops: list[pg.Op]) -> tuple[list[str], str]:
    """Apply `ops` as pg_batch does, inside a transaction held open here: their outcomes,
    and the synchronous_commit their transaction's commit would read."""
    with psycopg.connect(get_settings().database_url, autocommit=True) as connection:
        with connection.transaction():
            outcomes = pg._apply_run(connection, ops, pg.statement_for(ops))
            setting = connection.execute("SELECT current_setting('synchronous_commit')"
                                         ).fetchone()
        assert setting is not None
        return [o["outcome"] for o in outcomes], str(setting[0])


def test_only_a_batch_of_reservations_alone_commits_without_waiting_for_its_flush() -> None:
    add_agent(AGENT)
    set_budget(AGENT, tokens=10**6)
    server_default = _commit_setting([_claim("none-such")])[1]
    assert server_default != "off", "this check needs a server that waits for its flush"
    assert _commit_setting([_reserve("a"), _reserve("b")]) == (["reserved", "reserved"], "off")
    for mixed in ([_reserve("c"), _claim("a")], [_claim("b")], [_settle("a")],
                  [_reserve("d"), _settle("b")]):
        assert _commit_setting(mixed)[1] == server_default, mixed


def test_the_relaxed_commit_is_its_own_transactions_never_the_connections() -> None:
    """On a pooled connection in autocommit, the next statement (a claim, say) waits for its
    flush again."""
    add_agent(AGENT)
    set_budget(AGENT, tokens=10**6)
    with psycopg.connect(get_settings().database_url, autocommit=True) as connection:
        before = connection.execute("SHOW synchronous_commit").fetchone()
        pg._apply_run(connection, [_reserve("k")], pg.statement_for([_reserve("k")]))
        assert connection.execute("SHOW synchronous_commit").fetchone() == before
        assert [o["outcome"] for o in pg._apply_run(connection, [_claim("k")])] == ["claimed"]


def test_a_batch_with_a_key_twice_is_decided_whole() -> None:
    """Two runs of one batch share one transaction: a claim in the second keeps the first
    run's reservations from relaxing the commit."""
    assert pg.statement_for([_reserve("x"), _reserve("y")]) != pg.statement_for(
        [_reserve("x"), _claim("x")])
    assert pg.statement_for([_reserve("x"), _claim("x")]) == pg.statement_for([_claim("x")])


def _message() -> AiMessage:
    return AiMessage(agent_id=AGENT, prompt="what does a checkpoint flush?", max_tokens=16)


def _route(message: AiMessage) -> Envelope:
    outcome = routing.route(app, message, policies=Policies([BudgetAdmission()]))
    assert isinstance(outcome, HandOff), outcome
    return outcome.envelope


def _call(envelope: Envelope) -> Any:
    return calling.call(app, envelope, wait_s=5.0, policies=Policies([BudgetAdmission()]))


def _crash_takes_back(call_key: str) -> None:
    """What Postgres keeps of a reservation whose commit was not flushed when it crashed:
    nothing, neither the row nor its hold on the budget (one transaction)."""
    with get_engine().begin() as connection:
        taken = connection.execute(text(
            "UPDATE budgets b SET reserved_tokens = b.reserved_tokens - r.tokens, "
            "reserved_nusd = b.reserved_nusd - r.nusd FROM budget_reservations r "
            "WHERE r.call_key = :k AND r.state = 'reserved' AND b.agent_id = r.agent_id"),
            {"k": call_key}).rowcount
        connection.execute(text("DELETE FROM budget_reservations WHERE call_key = :k"),
                           {"k": call_key})
    assert taken == 1, f"no open reservation {call_key} to take back"


def _ledger(message_id: str) -> list[tuple[str, str]]:
    with get_engine().connect() as connection:
        return [(r.call_key, r.kind) for r in connection.execute(text(
            "SELECT call_key, kind FROM budget_ledger WHERE message_id = :m ORDER BY id"),
            {"m": message_id})]


def _billed(sim: RunningSimulator) -> list[str]:
    return [str(c["call_key"]) for c in sim.calls() if c["status"] == 200]


def test_a_reservation_a_crash_took_back_is_made_again_before_the_call(
        simulator: Callable[..., RunningSimulator], endpoint: Callable[..., Endpoint]) -> None:
    sim = simulator()
    endpoint(sim, "relaxed-one")
    add_agent(AGENT)
    set_budget(AGENT, usd="1")
    message = _message()
    envelope = _route(message)
    call_key = keys.call_key(message.id, 0)
    _crash_takes_back(call_key)

    done = _call(envelope)

    assert isinstance(done, Done), done
    assert _billed(sim) == [call_key], "one upstream call, under the message's own key"
    assert _ledger(message.id) == [(call_key, "call")], "charged once, as a call"
    assert_budget_invariants()


def test_a_reservation_made_again_that_no_longer_fits_fails_the_message_uncalled(
        simulator: Callable[..., RunningSimulator], endpoint: Callable[..., Endpoint]) -> None:
    """Between the crash and the call the budget was cut below the call's worst case: the
    reservation made again is denied, and nothing is called or charged."""
    sim = simulator()
    endpoint(sim, "relaxed-denied")
    add_agent(AGENT)
    set_budget(AGENT, usd="1")
    message = _message()
    envelope = _route(message)
    _crash_takes_back(keys.call_key(message.id, 0))
    set_budget(AGENT, usd="0.000000001")

    failed = _call(envelope)

    assert isinstance(failed, Failed) and isinstance(failed.error, BudgetExceeded), failed
    assert _billed(sim) == [], "a call that was never reserved was made"
    assert _ledger(message.id) == []
    assert_budget_invariants()


def test_budget_batches_take_sqlalchemys_spelling_of_a_postgres_url() -> None:
    """`postgresql+psycopg://` is a database URL the settings accept; libpq knows no
    driver, so the budget batches' own connections drop it."""
    from aimesh_tasks.db.engine import autocommit_connection

    url = get_settings().database_url.replace("postgresql://", "postgresql+psycopg://", 1)
    with autocommit_connection(url) as connection:
        assert connection.execute("SELECT 1").fetchone() == (1,)
    with autocommit_connection(url, relaxed=True) as connection:
        assert connection.execute("SHOW synchronous_commit").fetchone() == ("off",)
