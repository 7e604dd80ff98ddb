"""Budgets, reservations, ledger, period resets, audit events; endpoint output cap.

Revision ID: 0002_budgets
Revises: 0001_spine
Create Date: 2026-11-23
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import JSONB

revision = "0002_budgets"
down_revision = "0001_spine"
branch_labels = None
depends_on = None

JsonType = sa.JSON().with_variant(JSONB(), "postgresql")
BigId = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
Stamp = sa.DateTime(timezone=True)


def upgrade() -> None:
    with op.batch_alter_table("endpoints") as batch:
        batch.add_column(sa.Column("max_output_tokens", sa.Integer()))
    op.create_table(
        "budgets",
        sa.Column("agent_id", sa.String(64), sa.ForeignKey("agents.id"), primary_key=True),
        sa.Column("token_limit", sa.BigInteger()),
        sa.Column("usd_limit_nusd", sa.BigInteger()),
        sa.Column("period", sa.String(16), nullable=False),
        sa.Column("rolling_s", sa.Integer()),
        sa.Column("period_start", Stamp, nullable=False),
        sa.Column("expires_at", Stamp),
        sa.Column("spent_tokens", sa.BigInteger(), nullable=False),
        sa.Column("spent_nusd", sa.BigInteger(), nullable=False),
        sa.Column("reserved_tokens", sa.BigInteger(), nullable=False),
        sa.Column("reserved_nusd", sa.BigInteger(), nullable=False),
        sa.Column("updated_at", Stamp, nullable=False),
        sa.CheckConstraint("spent_tokens >= 0 AND spent_nusd >= 0", name="spent_not_negative"),
        sa.CheckConstraint("reserved_tokens >= 0 AND reserved_nusd >= 0",
                           name="reserved_not_negative"),
    )
    op.create_table(
        "budget_reservations",
        sa.Column("call_key", sa.String(160), primary_key=True),
        sa.Column("agent_id", sa.String(64), nullable=False, index=True),
        sa.Column("message_id", sa.String(128), nullable=False, index=True),
        sa.Column("endpoint_id", sa.String(64), nullable=False),
        sa.Column("tokens", sa.BigInteger(), nullable=False),
        sa.Column("nusd", sa.BigInteger(), nullable=False),
        sa.Column("state", sa.String(16), nullable=False, index=True),
        sa.Column("created_at", Stamp, nullable=False, index=True),
        sa.Column("called_at", Stamp),
        sa.Column("closed_at", Stamp),
    )
    op.create_table(
        "budget_ledger",
        sa.Column("id", BigId, primary_key=True, autoincrement=True),
        sa.Column("call_key", sa.String(160), nullable=False, unique=True),
        sa.Column("agent_id", sa.String(64), nullable=False, index=True),
        sa.Column("message_id", sa.String(128), nullable=False, index=True),
        sa.Column("endpoint_id", sa.String(64), nullable=False),
        sa.Column("tokens", sa.BigInteger(), nullable=False),
        sa.Column("nusd", sa.BigInteger(), nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("created_at", Stamp, nullable=False, index=True),
    )
    op.create_table(
        "budget_resets",
        sa.Column("id", BigId, primary_key=True, autoincrement=True),
        sa.Column("agent_id", sa.String(64), nullable=False, index=True),
        sa.Column("period_start", Stamp, nullable=False),
        sa.Column("new_period_start", Stamp, nullable=False),
        sa.Column("spent_tokens", sa.BigInteger(), nullable=False),
        sa.Column("spent_nusd", sa.BigInteger(), nullable=False),
        sa.Column("created_at", Stamp, nullable=False),
    )
    op.create_table(
        "audit_events",
        sa.Column("id", BigId, primary_key=True, autoincrement=True),
        sa.Column("row_key", sa.String(32), nullable=False, unique=True),
        sa.Column("event", sa.String(24), nullable=False, index=True),
        sa.Column("agent_id", sa.String(64), nullable=False, index=True),
        sa.Column("message_id", sa.String(128), nullable=False, index=True),
        sa.Column("endpoint_id", sa.String(64)),
        sa.Column("tokens", sa.BigInteger(), nullable=False),
        sa.Column("cost_nusd", sa.BigInteger(), nullable=False),
        sa.Column("reason", sa.String(512)),
        sa.Column("detail", JsonType, nullable=False),
        sa.Column("created_at", Stamp, nullable=False, index=True),
    )


def downgrade() -> None:
    op.drop_table("audit_events")
    op.drop_table("budget_resets")
    op.drop_table("budget_ledger")
    op.drop_table("budget_reservations")
    op.drop_table("budgets")
    with op.batch_alter_table("endpoints") as batch:
        batch.drop_column("max_output_tokens")
