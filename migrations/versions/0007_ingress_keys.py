"""Ingress API keys (hashes only) and the ingress's stored batches.

Revision ID: 0007_ingress_keys
Revises: 0003_workflows
Create Date: 2026-12-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import JSONB

revision = "0007_ingress_keys"
down_revision = "0003_workflows"
branch_labels = None
depends_on = None

JsonType = sa.JSON().with_variant(JSONB(), "postgresql")
Stamp = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "ingress_keys",
        sa.Column("prefix", sa.String(32), primary_key=True),
        sa.Column("key_sha256", sa.String(64), nullable=False),
        sa.Column("agent_id", sa.String(64), nullable=False, index=True),
        sa.Column("acts_for", JsonType, nullable=False),
        sa.Column("admin", sa.Boolean(), nullable=False),
        sa.Column("note", sa.String(256), nullable=False),
        sa.Column("created_at", Stamp, nullable=False),
        sa.Column("expires_at", Stamp),
        sa.Column("revoked_at", Stamp),
    )


def downgrade() -> None:
    op.drop_table("ingress_keys")
