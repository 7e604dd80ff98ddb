"""Engines (one per URL per process) and the session scope.

A Postgres engine's pool opens at most AIMESH_DB_POOL_SIZE connections (aimesh_tasks/pools.py
says why that is not the worker's concurrency); a thread that finds them all busy waits up
to AIMESH_DB_POOL_TIMEOUT_S, then gets DbPoolExhausted naming both settings.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import psycopg
from sqlalchemy import Engine, create_engine, event
from sqlalchemy import exc as sa_exc
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.pool import PoolProxiedConnection, QueuePool

from aimesh_tasks.settings import get_settings


class DbPoolExhausted(sa_exc.TimeoutError):
    """Every Postgres connection of this process's pool stayed busy for the whole wait (a
    SQLAlchemy TimeoutError, which the task shells retry as an outage)."""

    def __init__(self, size: int, waited_s: float) -> None:
        super().__init__(
            f"all {size} Postgres connections of this process (AIMESH_DB_POOL_SIZE) stayed "
            f"busy for {waited_s:g} s (AIMESH_DB_POOL_TIMEOUT_S). A task holds one for a "
            "statement at a time, so this means slow statements (locks, a busy server) or more "
            "load than the pool carries. Fix: raise AIMESH_DB_POOL_SIZE (every process of "
            "the cluster shares the server's max_connections) or lower the worker's concurrency")
        self.size = size


class _BoundedPool(QueuePool):
    """QueuePool whose timeout says which settings to change."""

    def connect(self) -> PoolProxiedConnection:
        try:
            return super().connect()
        except sa_exc.TimeoutError as exc:
            if isinstance(exc, DbPoolExhausted):
                raise
            raise DbPoolExhausted(self.size(), self.timeout()) from exc


_engines: dict[str, Engine] = {}
_sessionmakers: dict[str, sessionmaker[Session]] = {}


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    # WAL lets the embedded worker threads read while one writes; busy_timeout waits
    # for the writer instead of failing with "database is locked". The driver's own
    # transaction handling is off so that _sqlite_begin can take the write lock up front.
    dbapi_connection.isolation_level = None
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA busy_timeout=10000")
    cursor.close()


def _sqlite_begin(connection: Any) -> None:
    # BEGIN IMMEDIATE: a budget check-then-update never races another writer; a deferred
    # transaction would read a stale row and then fail on upgrading its lock.
    connection.exec_driver_sql("BEGIN IMMEDIATE")


def get_engine(url: str | None = None) -> Engine:
    """The engine for `url` (default AIMESH_DATABASE_URL), created once per process."""
    url = url or get_settings().database_url
    engine = _engines.get(url)
    if engine is None:
        if url.startswith("postgresql://"):
            url_for_driver = "postgresql+psycopg://" + url.removeprefix("postgresql://")
        else:
            url_for_driver = url
        # No pre-ping: it costs a round trip per transaction on the message path; pooled
        # connections are recycled instead, and a broken one fails its task, which the
        # broker redelivers (acks_late).
        engine = create_engine(url_for_driver, pool_recycle=1800,
                               connect_args=_postgres_options(url), **_pool_options(url))
        _engines[url] = engine
        if engine.dialect.name == "sqlite":
            event.listen(engine, "connect", _sqlite_pragmas)
            event.listen(engine, "begin", _sqlite_begin)
            if get_settings().embedded:
                _migrate_embedded(url)
    return engine


# The option of connections whose commits do not wait for the WAL flush.
_RELAXED = "-c synchronous_commit=off"


def _postgres_options(url: str, *extra: str) -> dict[str, Any]:
    """Connection options of a Postgres URL: statement and lock timeouts (a statement
    stuck behind a lock fails with a transient error, which makes its task retry, instead
    of holding a worker for ever), a connect timeout (an unreachable host fails fast), and
    the process id as application_name (pg_stat_activity shows whose session is whose)."""
    if not url.startswith("postgresql"):
        return {}
    settings = get_settings()
    options = [f"-c statement_timeout={int(settings.db_statement_timeout_s * 1000)}",
               f"-c lock_timeout={int(settings.db_lock_timeout_s * 1000)}", *extra]
    return {"options": " ".join(options), "connect_timeout": 10,
            "application_name": f"aimesh-{os.getpid()}"}


def _pool_options(url: str) -> dict[str, Any]:
    """A Postgres engine's pool: at most AIMESH_DB_POOL_SIZE connections, kept once
    opened, and a bounded wait for one (SQLite keeps SQLAlchemy's defaults)."""
    if not url.startswith("postgresql"):
        return {}
    settings = get_settings()
    return {"poolclass": _BoundedPool, "pool_size": settings.db_pool_size, "max_overflow": 0,
            "pool_timeout": settings.db_pool_timeout_s}


def get_relaxed_engine(url: str | None = None) -> Engine:
    """An autocommit engine whose commits do not wait for the WAL flush (Postgres
    synchronous_commit=off: 0.25 ms instead of ~5 ms here), for records that may be lost
    in a Postgres crash, never half-written; elsewhere the same as `get_engine`."""
    url = url or get_settings().database_url
    key = f"relaxed:{url}"
    engine = _engines.get(key)
    if engine is None:
        base = get_engine(url)
        if base.dialect.name != "postgresql":
            return base
        engine = create_engine(base.url, pool_recycle=1800, isolation_level="AUTOCOMMIT",
                               connect_args=_postgres_options(url, _RELAXED),
                               **_pool_options(url))
        _engines[key] = engine
    return engine


class _AutocommitPool:
    """Reused psycopg connections to one Postgres URL, in autocommit (`extra`: more
    server settings, as `-c name=value` options)."""

    def __init__(self, url: str, *extra: str) -> None:
        self.url = url
        self._extra = extra
        self._idle: list[psycopg.Connection[Any]] = []
        self._lock = threading.Lock()

    @contextmanager
    def connection(self) -> Iterator[psycopg.Connection[Any]]:
        with self._lock:
            connection = self._idle.pop() if self._idle else None
        if connection is None:
            connection = psycopg.connect(self.url, autocommit=True,
                                         **_postgres_options(self.url, *self._extra))
        try:
            yield connection
        finally:
            if connection.closed or connection.broken:  # dropped: the next use reconnects
                connection.close()
            else:
                with self._lock:
                    self._idle.append(connection)

    def dispose(self, close: bool) -> None:
        with self._lock:
            idle, self._idle = self._idle, []
        for connection in idle if close else ():
            connection.close()


_autocommit_pools: dict[tuple[str, bool], _AutocommitPool] = {}
_SQLALCHEMY_DRIVER = "postgresql+psycopg://"


@contextmanager
def autocommit_connection(url: str | None = None, *, relaxed: bool = False
                          ) -> Iterator[psycopg.Connection[Any]]:
    """A pooled psycopg connection to Postgres (default AIMESH_DATABASE_URL) in autocommit:
    each statement its own transaction, durable when it returns, in one round trip. For
    a hot path that sends one statement per transaction, where the engine's execute and
    pool checkout cost as much CPU as the statement. `relaxed`: from a pool whose commits
    do not wait for the WAL flush (as `get_relaxed_engine`'s). Errors are raised as
    SQLAlchemy's (an OperationalError stays transient for the tasks)."""
    url = url or get_settings().database_url
    if url.startswith(_SQLALCHEMY_DRIVER):  # SQLAlchemy's spelling; libpq's has no driver
        url = "postgresql://" + url[len(_SQLALCHEMY_DRIVER):]
    if not url.startswith("postgresql://"):
        raise ValueError(f"database_url: {url!r} is not a Postgres URL (postgresql://...)")
    key = (url, relaxed)
    pool = _autocommit_pools.get(key) or _autocommit_pools.setdefault(
        key, _AutocommitPool(url, *((_RELAXED,) if relaxed else ())))
    try:
        with pool.connection() as connection:
            yield connection
    except psycopg.Error as exc:
        raise sa_exc.DBAPIError.instance(None, None, exc, psycopg.Error) from exc


def _migrate_embedded(url: str) -> None:
    # Embedded mode needs no `aimesh db upgrade`: its SQLite file is migrated on first use.
    from aimesh_tasks.db.migrate import upgrade_once

    upgrade_once(url)


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


def dispose_engines(*, close: bool = True) -> None:
    """Drop every engine and its pooled connections; after a fork pass close=False, since
    the parent's connections are not this process's to close."""
    for engine in _engines.values():
        engine.dispose(close=close)
    for pool in _autocommit_pools.values():
        pool.dispose(close)
    _engines.clear()
    _sessionmakers.clear()
    _autocommit_pools.clear()
