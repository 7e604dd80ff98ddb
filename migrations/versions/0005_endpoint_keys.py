"""Endpoints can name a key file (a path on their workers, never the key).

Revision ID: 0005_endpoint_keys
Revises: 0003_workflows
Create Date: 2026-12-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005_endpoint_keys"
down_revision = "0003_workflows"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("endpoints", sa.Column("api_key_file", sa.String(1024), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("endpoints") as batch:  # SQLite rebuilds the table
        batch.drop_column("api_key_file")
