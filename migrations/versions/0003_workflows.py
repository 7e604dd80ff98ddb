"""Workflow runs and their steps.

Revision ID: 0003_workflows
Revises: 0002_budgets
Create Date: 2026-11-24
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import JSONB

revision = "0003_workflows"
down_revision = "0002_budgets"
branch_labels = None
depends_on = None

JsonType = sa.JSON().with_variant(JSONB(), "postgresql")
Stamp = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "workflow_runs",
        sa.Column("id", sa.String(64), primary_key=True),
        sa.Column("name", sa.String(128), nullable=False),
        sa.Column("agent_id", sa.String(64), nullable=False, index=True),
        sa.Column("policy", sa.String(16), nullable=False),
        sa.Column("status", sa.String(16), nullable=False, index=True),
        sa.Column("definition", JsonType, nullable=False),
        sa.Column("result", JsonType),
        sa.Column("planned_tokens", sa.BigInteger(), nullable=False),
        sa.Column("planned_nusd", sa.BigInteger(), nullable=False),
        sa.Column("created_at", Stamp, nullable=False, index=True),
        sa.Column("started_at", Stamp),
        sa.Column("finished_at", Stamp),
    )
    op.create_table(
        "workflow_steps",
        sa.Column("run_id", sa.String(64),
                  sa.ForeignKey("workflow_runs.id", ondelete="CASCADE"), primary_key=True),
        sa.Column("step_id", sa.String(64), primary_key=True),
        sa.Column("position", sa.Integer(), nullable=False),
        sa.Column("level", sa.Integer(), nullable=False),
        sa.Column("message_id", sa.String(128), nullable=False, index=True),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("depends_on", JsonType, nullable=False),
        sa.Column("endpoint_id", sa.String(64)),
        sa.Column("input_tokens", sa.Integer(), nullable=False),
        sa.Column("output_tokens", sa.Integer(), nullable=False),
        sa.Column("cost_nusd", sa.BigInteger(), nullable=False),
        sa.Column("cached", sa.Boolean(), nullable=False),
        sa.Column("output", sa.Text()),
        sa.Column("error", JsonType),
        sa.Column("started_at", Stamp),
        sa.Column("finished_at", Stamp),
    )


def downgrade() -> None:
    op.drop_table("workflow_steps")
    op.drop_table("workflow_runs")
