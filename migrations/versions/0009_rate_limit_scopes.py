"""Rate limits per API key and per second, and what a message over a limit gets.

Revision ID: 0009_rate_limit_scopes
Revises: 0007_ingress_keys (and needs 0006_routes, whose rate_limits table it alters)
Create Date: 2026-12-08
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0009_rate_limit_scopes"
down_revision = "0007_ingress_keys"
branch_labels = None
depends_on = "0006_routes"

COUNTS = ("requests_per_second", "requests_per_minute", "tokens_per_minute",
          "requests_per_day", "tokens_per_day")


def _on_excess() -> sa.Column[str]:
    return sa.Column("on_excess", sa.String(8), nullable=False, server_default="refuse")


def upgrade() -> None:
    with op.batch_alter_table("rate_limits") as table:
        table.add_column(sa.Column("requests_per_second", sa.BigInteger()))
        table.add_column(_on_excess())
    with op.batch_alter_table("ingress_keys") as table:
        for name in COUNTS:
            table.add_column(sa.Column(name, sa.BigInteger()))
        table.add_column(_on_excess())
    with op.batch_alter_table("ingress_batches") as table:
        table.add_column(sa.Column("api_key", sa.String(32)))


def downgrade() -> None:
    with op.batch_alter_table("ingress_batches") as table:
        table.drop_column("api_key")
    with op.batch_alter_table("ingress_keys") as table:
        table.drop_column("on_excess")
        for name in reversed(COUNTS):
            table.drop_column(name)
    with op.batch_alter_table("rate_limits") as table:
        table.drop_column("on_excess")
        table.drop_column("requests_per_second")
