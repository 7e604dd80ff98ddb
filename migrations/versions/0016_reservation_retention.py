"""Closed reservations are deleted after the journal's retention (issue 18, goal 6).

A reservation row was kept for ever: one per upstream call, with four indexes, in the
table every reserve, claim and settle writes. At 500 calls a second that is 43 million
rows a day, and a primary key of random call keys that outgrows memory, so every cycle
gets slower as the table grows. A closed reservation (settled or released) is needed
only while a delivery of its call may still come, the same window as its journal
entry's (`pipeline/journal.retention_s`: the reservation timeout plus a day); the
ledger row is the record of the charge and stays. The workers now delete closed
reservations past that window (`budgets/ledger.forget_closed`), entry and all.

A call key can come again after that (a client that publishes a message id again days
later): its reservation is gone, but its ledger row says it was charged. So
`budget_apply` now also looks in the ledger where it finds no reservation: a
reservation of a charged call key is 'held' as settled (at what was charged), and its
claim finds it 'settled', as they did while the row was kept; the caller then calls
under a new key (`pipeline/call.py` `_take_over`), and the ledger never gets a second
row for one call key (its unique constraint would fail the whole batch). The function
is 0015's text with those changes (ledger.py's general path does the same).

The index the sweep reads changes with it: `ix_budget_reservations_kept` (settlements
keeping an entry, by closed_at) becomes `ix_budget_reservations_closed` (every closed
reservation, by closed_at). A settle changes `state`, so it was never a HOT update: the
entry in this index is its one extra write, where a settle keeping an entry made one
before.

Revision ID: 0016_reservation_retention
Revises: 0015_budget_plans
Create Date: 2026-12-04
"""

from __future__ import annotations

from types import ModuleType

import sqlalchemy as sa
from alembic import op

from aimesh_tasks.db.revisions import edited, sibling

revision = "0016_reservation_retention"
down_revision = "0015_budget_plans"
branch_labels = None
depends_on = None

CLOSED = sa.text("state <> 'reserved'")
KEPT = sa.text("journal_entry IS NOT NULL")

# (0015's text, what it becomes): claims and reservations of a call key with no
# reservation look for its ledger row. A claim looks only then (a CASE evaluates its
# subquery only when reached: a claim of a reserved call, the common one, probes
# nothing); a reservation probes the ledger once for each of its keys (`charged`,
# materialized, read by the new reservations' filter and by the outcomes).
SEES_LEDGER = (
    ("        WHEN r.call_key IS NULL THEN 'missing'\n",
     "        WHEN r.call_key IS NULL AND EXISTS (\n"
     "          SELECT 1 FROM budget_ledger l WHERE l.call_key = c.call_key) THEN 'settled'\n"
     "        WHEN r.call_key IS NULL THEN 'missing'\n"),
    ("      FROM jsonb_array_elements(reserves) WITH ORDINALITY AS t(e, i)),\n"
     "    cand AS (",
     "      FROM jsonb_array_elements(reserves) WITH ORDINALITY AS t(e, i)),\n"
     "    charged AS (  -- call keys settled already, whose reservations were deleted since\n"
     "      SELECT l.call_key, l.tokens, l.nusd FROM q JOIN budget_ledger l\n"
     "        ON l.call_key = q.call_key),\n"
     "    cand AS ("),
    ("      WHERE NOT EXISTS (SELECT 1 FROM budget_reservations r WHERE r.call_key = q.call_key)\n",
     "      WHERE NOT EXISTS (SELECT 1 FROM budget_reservations r WHERE r.call_key = q.call_key)\n"
     "        AND NOT EXISTS (SELECT 1 FROM charged h WHERE h.call_key = q.call_key)\n"),
    ("        WHEN r.call_key IS NOT NULL THEN '{\"outcome\": \"general\"}'\n",
     "        WHEN r.call_key IS NOT NULL THEN '{\"outcome\": \"general\"}'\n"
     "        WHEN h.call_key IS NOT NULL THEN jsonb_build_object(\n"
     "          'outcome', 'held', 'tokens', h.tokens, 'nusd', h.nusd, 'state', 'settled')\n"),
    ("    FROM q LEFT JOIN budget_reservations r ON r.call_key = q.call_key\n",
     "    FROM q LEFT JOIN budget_reservations r ON r.call_key = q.call_key\n"
     "           LEFT JOIN charged h ON h.call_key = q.call_key\n"),
)


def _budget_plans() -> ModuleType:
    """Revision 0015's module (its function text)."""
    return sibling(__file__, "0015_budget_plans.py")


def apply_seeing_ledger() -> str:
    """budget_apply as this revision defines it."""
    return edited(_budget_plans().apply_by_key(), SEES_LEDGER, revision)


def upgrade() -> None:
    op.drop_index("ix_budget_reservations_kept", "budget_reservations")
    op.create_index("ix_budget_reservations_closed", "budget_reservations", ["closed_at"],
                    postgresql_where=CLOSED, sqlite_where=CLOSED)
    if op.get_bind().dialect.name == "postgresql":
        op.execute(apply_seeing_ledger())


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute(_budget_plans().apply_by_key())
    op.drop_index("ix_budget_reservations_closed", "budget_reservations")
    op.create_index("ix_budget_reservations_kept", "budget_reservations", ["closed_at"],
                    postgresql_where=KEPT, sqlite_where=KEPT)
