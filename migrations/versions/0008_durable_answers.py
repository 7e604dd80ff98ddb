"""A settled call keeps its journal entry (aimesh_tasks/pipeline/durable.py).

The column, and on Postgres the batch function of 0010_budget_batches taught to write it:
its settle sets `journal_entry` from the operation's `entry` (absent: NULL). The
function is 0010's text with those two changes, so this revision depends on 0010 and
its downgrade puts 0010's function back.

Revision ID: 0008_durable_answers
Revises: 0007_ingress_keys
Depends on: 0010_budget_batches
Create Date: 2026-12-01
"""

from __future__ import annotations

from types import ModuleType

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import JSONB

from aimesh_tasks.db.revisions import edited, sibling

revision = "0008_durable_answers"
down_revision = "0007_ingress_keys"
branch_labels = None
depends_on = "0010_budget_batches"

JsonType = sa.JSON().with_variant(JSONB(), "postgresql")
# (0010's text, what it becomes): the settle's operations carry the entry, and the
# UPDATE that settles a reservation keeps it.
KEEPS_ENTRY = (
    ("t.e->>'kind' AS kind", "t.e->>'kind' AS kind, t.e->'entry' AS entry"),
    ("UPDATE budget_reservations r SET state = 'settled', closed_at = now()",
     "UPDATE budget_reservations r SET state = 'settled', closed_at = now(),\n"
     "                                    journal_entry = s.entry"),
)


def _batches() -> ModuleType:
    """Revision 0010's module (its function text)."""
    return sibling(__file__, "0010_budget_batches.py")


def _apply_keeping_entries() -> str:
    return edited(str(_batches().APPLY), KEEPS_ENTRY, revision)


def upgrade() -> None:
    op.add_column("budget_reservations", sa.Column("journal_entry", JsonType))
    # The retention sweep's one query: settled calls that still keep an answer, oldest first.
    op.create_index("ix_budget_reservations_kept", "budget_reservations", ["closed_at"],
                    postgresql_where=sa.text("journal_entry IS NOT NULL"),
                    sqlite_where=sa.text("journal_entry IS NOT NULL"))
    if op.get_bind().dialect.name == "postgresql":
        op.execute(_apply_keeping_entries())


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute(str(_batches().APPLY))
    op.drop_index("ix_budget_reservations_kept", "budget_reservations")
    op.drop_column("budget_reservations", "journal_entry")
