"""The durable record of accepted messages (aimesh_tasks/delivery/accepted.py).

Revision ID: 0004_accepted
Revises: 0003_workflows
Create Date: 2026-12-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import JSONB

revision = "0004_accepted"
down_revision = "0003_workflows"
branch_labels = None
depends_on = None

JsonType = sa.JSON().with_variant(JSONB(), "postgresql")
Stamp = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "accepted_messages",
        sa.Column("message_id", sa.String(128), primary_key=True),
        sa.Column("agent_id", sa.String(64), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("message", JsonType),
        sa.Column("republished", sa.Integer(), nullable=False, server_default="0"),
        sa.Column("accepted_at", Stamp, nullable=False),
        sa.Column("updated_at", Stamp, nullable=False),
        sa.Column("finished_at", Stamp),
    )
    # The reconciler's one query: unfinished messages by how long they have been quiet.
    op.create_index("ix_accepted_messages_state_updated", "accepted_messages",
                    ["state", "updated_at"])


def downgrade() -> None:
    op.drop_index("ix_accepted_messages_state_updated", "accepted_messages")
    op.drop_table("accepted_messages")
