"""Single-statement Postgres forms of reserve, claim and settle: the common case in one
round trip and one commit, with the same row locks and conditions as the general path.

Each returns None when it cannot decide alone (an existing reservation, a refusal that
must be audited with its snapshot, no budget row, a period that has rolled over); the
transaction is then rolled back and the caller takes the general path in ledger.py.
A conditional UPDATE re-checks its WHERE clause on the newest row version after waiting
for the row lock, so concurrent reservations still never exceed a limit.
"""

from __future__ import annotations

from typing import Any, Literal

from sqlalchemy import text

from aimesh_tasks.budgets.estimate import Estimate
from aimesh_tasks.db import get_engine

# The budget's current period has not rolled over (else the general path records a reset).
_PERIOD_IS_CURRENT = """
    CASE period
      WHEN 'none' THEN true
      WHEN 'daily' THEN period_start >= date_trunc('day', now() AT TIME ZONE 'UTC')
                                          AT TIME ZONE 'UTC'
      WHEN 'monthly' THEN period_start >= date_trunc('month', now() AT TIME ZONE 'UTC')
                                          AT TIME ZONE 'UTC'
      WHEN 'rolling' THEN now() < period_start + make_interval(secs => rolling_s)
    END"""

_RESERVE = text(f"""
WITH ins AS (
  INSERT INTO budget_reservations
    (call_key, agent_id, message_id, endpoint_id, tokens, nusd, state, created_at)
  VALUES (:call_key, :agent_id, :message_id, :endpoint_id, :tokens, :nusd, 'reserved', now())
  ON CONFLICT (call_key) DO NOTHING
  RETURNING call_key),
upd AS (
  UPDATE budgets SET reserved_tokens = reserved_tokens + :tokens,
                     reserved_nusd = reserved_nusd + :nusd, updated_at = now()
  WHERE agent_id = :agent_id AND EXISTS (SELECT 1 FROM ins)
    AND {_PERIOD_IS_CURRENT}
    AND (expires_at IS NULL OR expires_at > now())
    AND (token_limit IS NULL OR spent_tokens + reserved_tokens + :tokens <= token_limit)
    AND (usd_limit_nusd IS NULL OR spent_nusd + reserved_nusd + :nusd <= usd_limit_nusd)
  RETURNING 1)
SELECT (SELECT count(*) FROM ins) AS inserted, (SELECT count(*) FROM upd) AS reserved,
       EXISTS (SELECT 1 FROM budgets WHERE agent_id = :agent_id) AS metered
""")

_CLAIM = text("""
UPDATE budget_reservations SET called_at = now()
WHERE call_key = :call_key AND state = 'reserved' AND called_at IS NULL
RETURNING 1
""")

_SETTLE = text(f"""
WITH r AS (
  UPDATE budget_reservations SET state = 'settled', closed_at = now()
  WHERE call_key = :call_key AND state = 'reserved'
  RETURNING agent_id, message_id, endpoint_id, tokens, nusd),
b AS (
  UPDATE budgets SET reserved_tokens = budgets.reserved_tokens - r.tokens,
                     reserved_nusd = budgets.reserved_nusd - r.nusd,
                     spent_tokens = spent_tokens + :tokens, spent_nusd = spent_nusd + :nusd,
                     updated_at = now()
  FROM r WHERE budgets.agent_id = r.agent_id AND {_PERIOD_IS_CURRENT}
  RETURNING budgets.agent_id,
            budgets.token_limit - budgets.spent_tokens - budgets.reserved_tokens AS tokens_left,
            budgets.usd_limit_nusd - budgets.spent_nusd - budgets.reserved_nusd AS nusd_left),
l AS (
  INSERT INTO budget_ledger
    (call_key, agent_id, message_id, endpoint_id, tokens, nusd, kind, created_at)
  SELECT :call_key, agent_id, message_id, endpoint_id, :tokens, :nusd, :kind, now() FROM r
  RETURNING 1)
SELECT (SELECT count(*) FROM r) AS closed, (SELECT count(*) FROM l) AS charged,
       b.agent_id, b.tokens_left, b.nusd_left
FROM (SELECT 1) one LEFT JOIN b ON true
""")


def available() -> bool:
    """True when the database is Postgres (data-modifying CTEs)."""
    return get_engine().dialect.name == "postgresql"


def _decide(statement: Any, params: dict[str, Any], accept: Any) -> Any:
    """Run one statement; commit and return accept(row) if it is not None, else roll back."""
    with get_engine().connect() as connection:
        transaction = connection.begin()
        row = connection.execute(statement, params).first()
        decided = accept(row)
        if decided is None:
            transaction.rollback()
        else:
            transaction.commit()
        return decided


def reserve(agent_id: str, message_id: str, endpoint_id: str, call_key: str,
            need: Estimate) -> Literal["reserved", "unmetered"] | None:
    """'reserved' if reserved in one statement, 'unmetered' if the agent has no budget
    (nothing is kept), None when the general path must decide."""
    params = {"agent_id": agent_id, "message_id": message_id, "endpoint_id": endpoint_id,
              "call_key": call_key, "tokens": need.tokens, "nusd": need.nusd}
    with get_engine().connect() as connection:
        transaction = connection.begin()
        row = connection.execute(_RESERVE, params).one()
        if row.inserted == 1 and row.reserved == 1:
            transaction.commit()
            return "reserved"
        transaction.rollback()
        return "unmetered" if row.inserted == 1 and not row.metered else None


def claim(call_key: str) -> bool | None:
    """True if claimed in one statement; None when the general path must say why not."""
    return _decide(_CLAIM, {"call_key": call_key},  # type: ignore[no-any-return]
                   lambda row: True if row is not None else None)


def settle(call_key: str, tokens: int, nusd: int, kind: str
           ) -> tuple[str, int | None, int | None] | None:
    """(agent_id, tokens_left, nusd_left) if settled in one statement; None when the
    general path must decide (already closed, no budget row, a rolled-over period)."""
    params = {"call_key": call_key, "tokens": tokens, "nusd": nusd, "kind": kind}

    def accept(row: Any) -> tuple[str, int | None, int | None] | None:
        if row.closed == 1 and row.charged == 1 and row.agent_id is not None:
            return (row.agent_id, row.tokens_left, row.nusd_left)
        return None

    return _decide(_SETTLE, params, accept)  # type: ignore[no-any-return]
