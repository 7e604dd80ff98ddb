"""Apply alembic migrations from code (`aimesh db upgrade`)."""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config

from aimesh_tasks.settings import get_settings

MIGRATIONS_DIR = Path(__file__).resolve().parents[2] / "migrations"
# URLs already migrated (or being migrated) in this process. This module imports nothing
# of db.engine (the engine imports it, lazily, to migrate an embedded database once).
_migrated: set[str] = set()


def upgrade_once(url: str) -> None:
    """Migrate `url` unless this process migrated it already (the embedded database)."""
    if url not in _migrated:
        upgrade(url)


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
    _migrated.add(config.attributes["url"])
    return config


def upgrade(url: str | None = None, revision: str = "heads") -> None:
    """Bring the database up to `revision` (default: the newest)."""
    command.upgrade(alembic_config(url), revision)


def downgrade(url: str | None = None, revision: str = "base") -> None:
    """Take the database down to `revision` (default: empty)."""
    command.downgrade(alembic_config(url), revision)
