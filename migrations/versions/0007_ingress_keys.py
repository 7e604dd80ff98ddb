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
        sa.Column("respond_async", sa.Boolean(), nullable=False, server_default=sa.false()),
        sa.Column("created_at", Stamp, nullable=False),
        sa.Column("expires_at", Stamp),
        sa.Column("revoked_at", Stamp),
    )
    op.create_table(
        "ingress_files",
        sa.Column("id", sa.String(64), primary_key=True),
        sa.Column("agent_id", sa.String(64), nullable=False, index=True),
        sa.Column("purpose", sa.String(32), nullable=False),
        sa.Column("filename", sa.String(256), nullable=False),
        sa.Column("bytes", sa.BigInteger(), nullable=False),
        sa.Column("content", sa.Text(), nullable=False),
        sa.Column("created_at", Stamp, nullable=False),
    )
    op.create_table(
        "ingress_batches",
        sa.Column("id", sa.String(64), primary_key=True),
        sa.Column("agent_id", sa.String(64), nullable=False, index=True),
        sa.Column("input_file_id", sa.String(64), nullable=False),
        sa.Column("endpoint", sa.String(64), nullable=False),
        sa.Column("completion_window", sa.String(16), nullable=False),
        sa.Column("status", sa.String(16), nullable=False, index=True),
        sa.Column("output_file_id", sa.String(64)),
        sa.Column("error_file_id", sa.String(64)),
        sa.Column("total", sa.Integer(), nullable=False),
        sa.Column("batch_metadata", JsonType, nullable=False),
        sa.Column("created_at", Stamp, nullable=False),
        sa.Column("in_progress_at", Stamp),
        sa.Column("finalizing_at", Stamp),
        sa.Column("completed_at", Stamp),
        sa.Column("cancelling_at", Stamp),
        sa.Column("cancelled_at", Stamp),
    )
    op.create_table(
        "ingress_batch_lines",
        sa.Column("batch_id", sa.String(64),
                  sa.ForeignKey("ingress_batches.id", ondelete="CASCADE"), primary_key=True),
        sa.Column("line_no", sa.Integer(), primary_key=True),
        sa.Column("custom_id", sa.String(512), nullable=False),
        sa.Column("body", JsonType, nullable=False),
        sa.Column("state", sa.String(16), nullable=False, index=True),
        sa.Column("message_id", sa.String(128)),
        sa.Column("status_code", sa.Integer()),
        sa.Column("response", JsonType),
    )


def downgrade() -> None:
    # IF EXISTS: a database migrated by an earlier draft of this revision (keys only) can
    # still be taken down.
    for table in ("ingress_batch_lines", "ingress_batches", "ingress_files", "ingress_keys"):
        op.execute(f"DROP TABLE IF EXISTS {table}")
