"""Alembic environment: runs migrations on the engine of AIMESH_DATABASE_URL (or -x url=...)."""

from __future__ import annotations

from alembic import context

from aimesh_tasks.db.engine import get_engine
from aimesh_tasks.db.models import Base

target_metadata = Base.metadata


def run_migrations_online() -> None:
    """Run every pending migration in one transaction on the configured database."""
    url = context.config.attributes.get("url") or context.get_x_argument(as_dictionary=True).get(
        "url"
    )
    engine = get_engine(url)
    with engine.connect() as connection:
        context.configure(
            connection=connection,
            target_metadata=target_metadata,
            render_as_batch=engine.dialect.name == "sqlite",
        )
        with context.begin_transaction():
            context.run_migrations()
        connection.commit()


run_migrations_online()
