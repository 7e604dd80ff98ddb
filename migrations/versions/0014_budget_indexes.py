"""Fewer index writes per budget cycle (issue 18, goal 4).

A reserve + claim + settle cycle wrote a reservation into six indexes, rewrote it into
them again at the claim and at the settle (each a non-HOT update: `state` was indexed)
and wrote a ledger row into five: about twenty index entries per call, most of the
Postgres CPU of a cycle once the batches shared the commits (docs/design-notes.md).

- Reservations: `state`, `created_at` and `agent_id` served one query, the reaper's
  "reserved, oldest first" (`agent_id`: none). One partial index of the reserved ones by
  `created_at` serves it, holds only open reservations, and a settle leaves it.
- `called_at` is in no index, so a claim is a HOT update (no index entry) when its page
  has room. Claims made soon after the reservation find room on the page being filled;
  fillfactor 70 keeps room for a claim made after a long wait in a queue, when the
  reservation's page has long been full.
- Ledger: `agent_id` and `created_at` were two indexes for one question, an agent's
  charges over time; one index on both answers it (and `agent_id` alone).

Revision ID: 0014_budget_indexes
Revises: 0007_ingress_keys
Create Date: 2026-12-03
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0014_budget_indexes"
down_revision = "0007_ingress_keys"
branch_labels = None
depends_on = None

OPEN = sa.text("state = 'reserved'")
FILLFACTOR = 70


def upgrade() -> None:
    for name in ("state", "created_at", "agent_id"):
        op.drop_index(f"ix_budget_reservations_{name}", "budget_reservations")
    op.create_index("ix_budget_reservations_open", "budget_reservations", ["created_at"],
                    postgresql_where=OPEN, sqlite_where=OPEN)
    op.drop_index("ix_budget_ledger_agent_id", "budget_ledger")
    op.drop_index("ix_budget_ledger_created_at", "budget_ledger")
    op.create_index("ix_budget_ledger_agent_created", "budget_ledger",
                    ["agent_id", "created_at"])
    if op.get_bind().dialect.name == "postgresql":
        op.execute(f"ALTER TABLE budget_reservations SET (fillfactor = {FILLFACTOR})")


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute("ALTER TABLE budget_reservations RESET (fillfactor)")
    op.drop_index("ix_budget_ledger_agent_created", "budget_ledger")
    op.create_index("ix_budget_ledger_created_at", "budget_ledger", ["created_at"])
    op.create_index("ix_budget_ledger_agent_id", "budget_ledger", ["agent_id"])
    op.drop_index("ix_budget_reservations_open", "budget_reservations")
    for name in ("agent_id", "created_at", "state"):
        op.create_index(f"ix_budget_reservations_{name}", "budget_reservations", [name])
