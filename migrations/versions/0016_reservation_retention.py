"""Closed reservations are deleted after the journal's retention (issue 18, goal 6).

A reservation row was kept for ever: one per upstream call, with four indexes, in the
table every reserve, claim and settle writes. At 500 calls a second that is 43 million
rows a day, and a primary key of random call keys that outgrows memory, so every cycle
gets slower as the table grows. A closed reservation (settled or released) is needed
only while a delivery of its call may still come, the same window as its journal
entry's (`pipeline/journal.retention_s`: the reservation timeout plus a day); the
ledger row is the record of the charge and stays. The workers now delete closed
reservations past that window (`budgets/ledger.forget_closed`), entry and all.

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

import sqlalchemy as sa
from alembic import op

revision = "0016_reservation_retention"
down_revision = "0015_budget_plans"
branch_labels = None
depends_on = None

CLOSED = sa.text("state <> 'reserved'")
KEPT = sa.text("journal_entry IS NOT NULL")


def upgrade() -> None:
    op.drop_index("ix_budget_reservations_kept", "budget_reservations")
    op.create_index("ix_budget_reservations_closed", "budget_reservations", ["closed_at"],
                    postgresql_where=CLOSED, sqlite_where=CLOSED)


def downgrade() -> None:
    op.drop_index("ix_budget_reservations_closed", "budget_reservations")
    op.create_index("ix_budget_reservations_kept", "budget_reservations", ["closed_at"],
                    postgresql_where=KEPT, sqlite_where=KEPT)
