"""Apply alembic migrations from code (`aimesh db upgrade`)."""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config

from aimesh_tasks.db.engine import mark_migrated
from aimesh_tasks.settings import get_settings

MIGRATIONS_DIR = Path(__file__).resolve().parents[2] / "migrations"


def alembic_config(url: str | None = None) -> Config:
    """An alembic Config pointing at the project's migrations and the given database."""
    if not (MIGRATIONS_DIR / "env.py").exists():
        raise FileNotFoundError(
            f"alembic migrations not found at {MIGRATIONS_DIR}; install aimesh-tasks from its "
            "source tree (pip install -e .) so that migrations/ sits beside the package"
        )
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    config.attributes["url"] = url or get_settings().database_url
    mark_migrated(config.attributes["url"])
    return config


def upgrade(url: str | None = None, revision: str = "heads") -> None:
    """Bring the database up to `revision` (default: the newest)."""
    command.upgrade(alembic_config(url), revision)


def downgrade(url: str | None = None, revision: str = "base") -> None:
    """Take the database down to `revision` (default: empty)."""
    command.downgrade(alembic_config(url), revision)
