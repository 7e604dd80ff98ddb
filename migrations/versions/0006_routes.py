"""Governance: routes (intents, target, ACL, fallback) and agents' rate limits.

Revision ID: 0006_routes
Revises: 0003_workflows
Create Date: 2026-12-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import JSONB

revision = "0006_routes"
down_revision = "0003_workflows"
branch_labels = None
depends_on = None

JsonType = sa.JSON().with_variant(JSONB(), "postgresql")
Stamp = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "routes",
        sa.Column("name", sa.String(64), primary_key=True),
        sa.Column("description", sa.String(512), nullable=False),
        sa.Column("intents", JsonType, nullable=False),
        sa.Column("target", JsonType, nullable=False),
        sa.Column("allowed", JsonType),
        sa.Column("fallback", sa.String(64)),
        sa.Column("updated_at", Stamp, nullable=False),
    )
    op.create_table(
        "rate_limits",
        sa.Column("agent_id", sa.String(64), sa.ForeignKey("agents.id"), primary_key=True),
        sa.Column("requests_per_minute", sa.BigInteger()),
        sa.Column("tokens_per_minute", sa.BigInteger()),
        sa.Column("requests_per_day", sa.BigInteger()),
        sa.Column("tokens_per_day", sa.BigInteger()),
        sa.Column("updated_at", Stamp, nullable=False),
    )


def downgrade() -> None:
    op.drop_table("rate_limits")
    op.drop_table("routes")
