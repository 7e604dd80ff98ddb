"""The governance table each process keeps: routes, registered agents, rate limits (of
agents and of API keys).

Loaded from the database and kept until the governance version in Redis moves (every
change of routes, agents or limits replaces it, see governance/version.py). The message
path reads the version on routing's one round trip (`queue_table`), so a change is seen
by every worker on its next message at no extra round trip.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

from sqlalchemy import select

from aimesh_tasks import keys
from aimesh_tasks.db import AgentRow, session_scope
from aimesh_tasks.governance.limits import RateLimit, list_key_limits, list_rate_limits
from aimesh_tasks.governance.routes import Route, list_routes
from aimesh_tasks.redis_batch import Batch, Reader
from aimesh_tasks.redis_client import get_redis

_UNLOADED = object()


@dataclass(frozen=True)
class GovernanceTable:
    """Routes by name, registered agents (id → enabled), rate limits by agent id and by
    API key prefix."""

    version: str | None = None
    routes: dict[str, Route] = field(default_factory=dict)
    agents: dict[str, bool] = field(default_factory=dict)
    limits: dict[str, RateLimit] = field(default_factory=dict)
    key_limits: dict[str, RateLimit] = field(default_factory=dict)


def load_table(version: str | None) -> GovernanceTable:
    """Read the table from the database (tagged with the version read before it)."""
    with session_scope() as session:
        agents = {row.id: row.enabled for row in session.scalars(select(AgentRow))}
    return GovernanceTable(version, {r.name: r for r in list_routes()}, agents,
                           {limit.agent_id: limit for limit in list_rate_limits()},
                           {str(limit.api_key): limit for limit in list_key_limits()})


class TableCache:
    """The process's copy of the table, reloaded when the version read differs."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._version: object = _UNLOADED
        self._table = GovernanceTable()
        self._checked_at = 0.0

    def at(self, version: str | None) -> GovernanceTable:
        """The table as of `version`, reading the database only when it moved."""
        if version == self._version:
            return self._table
        with self._lock:
            if version != self._version:
                self._table = load_table(version)
                self._version = version
                self._checked_at = time.monotonic()
        return self._table

    def current(self, max_age_s: float | None = None) -> GovernanceTable:
        """The last table loaded (loaded now if none was, or if it was last checked more
        than `max_age_s` ago)."""
        stale = max_age_s is not None and time.monotonic() - self._checked_at > max_age_s
        if self._version is _UNLOADED or stale:
            version = get_redis().get(keys.governance_version())
            table = self.at(str(version) if version is not None else None)
            self._checked_at = time.monotonic()
            return table
        return self._table

    def clear(self) -> None:
        """Forget the copy: the next use reloads."""
        with self._lock:
            self._version = _UNLOADED
            self._table = GovernanceTable()


TABLE = TableCache()


def queue_table(batch: Batch) -> Reader[GovernanceTable]:
    """Queue reading the governance version; the reader gives the table as of it."""
    index = batch.get(keys.governance_version())  # one GET for all the policies asking
    return lambda: TABLE.at(None if batch[index] is None else str(batch[index]))
