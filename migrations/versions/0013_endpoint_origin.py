"""Endpoints say where they came from: an operator, or a worker that announced it.

Revision ID: 0013_endpoint_origin
Revises: 0007_ingress_keys
Create Date: 2026-12-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0013_endpoint_origin"
down_revision = "0007_ingress_keys"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("endpoints", sa.Column("origin", sa.String(16), nullable=False,
                                         server_default="operator"))


def downgrade() -> None:
    with op.batch_alter_table("endpoints") as batch:  # SQLite rebuilds the table
        batch.drop_column("origin")
