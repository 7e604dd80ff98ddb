"""Workflow dependency counters: a step's dependencies not yet done, a run's steps not
yet ended (aimesh_tasks/workflows/state.py).

Revision ID: 0013_workflow_counters
Revises: 0007_ingress_keys
Create Date: 2026-12-02
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0013_workflow_counters"
down_revision = "0007_ingress_keys"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("workflow_steps", sa.Column("waiting_on", sa.Integer(), nullable=False,
                                              server_default="0"))
    op.add_column("workflow_runs", sa.Column("steps_left", sa.Integer(), nullable=False,
                                             server_default="0"))


def downgrade() -> None:
    op.drop_column("workflow_runs", "steps_left")
    op.drop_column("workflow_steps", "waiting_on")
