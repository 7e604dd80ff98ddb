"""Spine: endpoints, agents, routing decisions, call attempts.

Revision ID: 0001_spine
Revises:
Create Date: 2026-11-23
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import JSONB

revision = "0001_spine"
down_revision = None
branch_labels = None
depends_on = None

JsonType = sa.JSON().with_variant(JSONB(), "postgresql")
BigId = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def _timestamps() -> list[sa.Column[object]]:
    return [
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=sa.func.now()),
    ]


def upgrade() -> None:
    op.create_table(
        "endpoints",
        sa.Column("id", sa.String(64), primary_key=True),
        sa.Column("provider", sa.String(32), nullable=False),
        sa.Column("base_url", sa.String(512), nullable=False),
        sa.Column("model", sa.String(128), nullable=False),
        sa.Column("api_key_env", sa.String(128)),
        sa.Column("input_nusd_per_1k", sa.BigInteger(), nullable=False),
        sa.Column("output_nusd_per_1k", sa.BigInteger(), nullable=False),
        sa.Column("capacity", sa.Integer(), nullable=False),
        sa.Column("tags", JsonType, nullable=False),
        sa.Column("enabled", sa.Boolean(), nullable=False),
        *_timestamps(),
        sa.Column("updated_at", sa.DateTime(timezone=True), server_default=sa.func.now()),
    )
    op.create_table(
        "agents",
        sa.Column("id", sa.String(64), primary_key=True),
        sa.Column("description", sa.String(512), nullable=False),
        sa.Column("enabled", sa.Boolean(), nullable=False),
        *_timestamps(),
    )
    op.create_table(
        "routing_decisions",
        sa.Column("id", BigId, primary_key=True, autoincrement=True),
        sa.Column("row_key", sa.String(32), nullable=False, unique=True),
        sa.Column("message_id", sa.String(128), nullable=False, index=True),
        sa.Column("agent_id", sa.String(64), nullable=False, index=True),
        sa.Column("winner", sa.String(64)),
        sa.Column("fallbacks", JsonType, nullable=False),
        sa.Column("candidates", JsonType, nullable=False),
        sa.Column("excluded", JsonType, nullable=False),
        sa.Column("weights", JsonType, nullable=False),
        sa.Column("error", sa.String(512)),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False, index=True),
    )
    op.create_table(
        "call_attempts",
        sa.Column("id", BigId, primary_key=True, autoincrement=True),
        sa.Column("row_key", sa.String(32), nullable=False, unique=True),
        sa.Column("message_id", sa.String(128), nullable=False, index=True),
        sa.Column("agent_id", sa.String(64), nullable=False, index=True),
        sa.Column("endpoint_id", sa.String(64), nullable=False, index=True),
        sa.Column("ok", sa.Boolean(), nullable=False),
        sa.Column("status", sa.Integer()),
        sa.Column("latency_ms", sa.Float(), nullable=False),
        sa.Column("input_tokens", sa.Integer(), nullable=False),
        sa.Column("output_tokens", sa.Integer(), nullable=False),
        sa.Column("cost_nusd", sa.BigInteger(), nullable=False),
        sa.Column("error", sa.String(512)),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False, index=True),
    )


def downgrade() -> None:
    op.drop_table("call_attempts")
    op.drop_table("routing_decisions")
    op.drop_table("agents")
    op.drop_table("endpoints")
