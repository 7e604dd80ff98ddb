"""Engines (one per URL per process) and the session scope."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.orm import Session, sessionmaker

from aimesh_tasks.settings import get_settings

_engines: dict[str, Engine] = {}
_sessionmakers: dict[str, sessionmaker[Session]] = {}


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    # WAL lets the embedded worker threads read while one writes; busy_timeout waits
    # for the writer instead of failing with "database is locked".
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA busy_timeout=10000")
    cursor.close()


def get_engine(url: str | None = None) -> Engine:
    """The engine for `url` (default AIMESH_DATABASE_URL), created once per process."""
    url = url or get_settings().database_url
    engine = _engines.get(url)
    if engine is None:
        if url.startswith("postgresql://"):
            url_for_driver = "postgresql+psycopg://" + url.removeprefix("postgresql://")
        else:
            url_for_driver = url
        engine = create_engine(url_for_driver, pool_pre_ping=True)
        if engine.dialect.name == "sqlite":
            event.listen(engine, "connect", _sqlite_pragmas)
        _engines[url] = engine
    return engine


def _sessionmaker(url: str | None) -> sessionmaker[Session]:
    key = url or get_settings().database_url
    maker = _sessionmakers.get(key)
    if maker is None:
        maker = sessionmaker(get_engine(key), expire_on_commit=False)
        _sessionmakers[key] = maker
    return maker


@contextmanager
def session_scope(url: str | None = None) -> Iterator[Session]:
    """A session that commits on success and rolls back on error."""
    with _sessionmaker(url).begin() as session:
        yield session


def dispose_engines() -> None:
    """Drop every engine's pooled connections (after fork, and at shutdown)."""
    for engine in _engines.values():
        engine.dispose(close=False)
    _engines.clear()
    _sessionmakers.clear()
