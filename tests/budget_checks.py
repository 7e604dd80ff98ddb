"""The budget invariants as SQL, checked at the end of every budget test; the probes the
budget batch tests share (a budget row held locked, a batch waiting for it); and a fresh
agent with a budget."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from contextlib import contextmanager

from sqlalchemy import Connection, text

from aimesh_tasks import outbox
from aimesh_tasks.budgets import set_budget
from aimesh_tasks.db import get_engine
from aimesh_tasks.governance.agents import add_agent

INVARIANTS = {
    "ledger sum equals spent (plus what period resets set aside), per agent": """
        SELECT b.agent_id FROM budgets b
        LEFT JOIN (SELECT agent_id, SUM(tokens) t, SUM(nusd) n FROM budget_ledger
                   GROUP BY agent_id) l ON l.agent_id = b.agent_id
        LEFT JOIN (SELECT agent_id, SUM(spent_tokens) t, SUM(spent_nusd) n FROM budget_resets
                   GROUP BY agent_id) r ON r.agent_id = b.agent_id
        WHERE COALESCE(l.t, 0) <> b.spent_tokens + COALESCE(r.t, 0)
           OR COALESCE(l.n, 0) <> b.spent_nusd + COALESCE(r.n, 0)""",
    "at most one settlement per call key": """
        SELECT call_key FROM budget_ledger GROUP BY call_key HAVING COUNT(*) > 1""",
    "nothing reserved at rest": """
        SELECT agent_id FROM budgets WHERE reserved_tokens <> 0 OR reserved_nusd <> 0
        UNION ALL SELECT call_key FROM budget_reservations WHERE state = 'reserved'""",
    "spent within the limit": """
        SELECT agent_id FROM budgets
        WHERE (token_limit IS NOT NULL AND spent_tokens > token_limit)
           OR (usd_limit_nusd IS NOT NULL AND spent_nusd > usd_limit_nusd)""",
}


def assert_budget_invariants() -> None:
    """Fail naming every invariant that some row breaks."""
    outbox.flush(wait_s=10)
    broken = {}
    with get_engine().connect() as connection:
        for name, query in INVARIANTS.items():
            rows = connection.execute(text(query)).fetchall()
            if rows:
                broken[name] = [tuple(r) for r in rows][:5]
    assert not broken, f"budget invariants broken: {broken}"


@contextmanager
def budget_row_locked(agent_id: str) -> Iterator[Connection]:
    """Hold the agent's budget row locked (as a slow transaction elsewhere would)."""
    with get_engine().connect() as connection:
        transaction = connection.begin()
        connection.execute(text("SELECT 1 FROM budgets WHERE agent_id = :a FOR UPDATE"),
                           {"a": agent_id})
        try:
            yield connection
        finally:
            transaction.rollback()


def blocked_batches() -> dict[int, str]:
    """Budget batches waiting in Postgres for a row lock: backend pid → application_name
    ('aimesh-<pid of the process that sent the batch>')."""
    with get_engine().connect() as connection:
        return dict(connection.execute(text(
            "SELECT pid, application_name FROM pg_stat_activity "
            "WHERE query LIKE 'SELECT budget_apply%' AND wait_event_type = 'Lock' "
            "AND datname = current_database()")).all())  # not another run's or a benchmark's


def blocked_batch() -> tuple[int, str] | None:
    """One budget batch waiting for a row lock (see blocked_batches), if there is one."""
    return next(iter(blocked_batches().items()), None)


def new_agent(prefix: str, usd: str | None = "1") -> str:
    """A registered agent with a unique id starting `prefix`, with a budget of `usd`
    (None: no budget)."""
    agent_id = f"{prefix}-{uuid.uuid4().hex[:6]}"
    add_agent(agent_id)
    if usd is not None:
        set_budget(agent_id, usd=usd)
    return agent_id
