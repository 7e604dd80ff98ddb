"""Agents' rate limits in the database: requests and tokens per minute and per day.

Enforced, shared by every worker, by the rate-limit policy (governance/rate_limit.py);
applied from the `rate_limits` section of a routes file or with `set_rate_limit`.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

from sqlalchemy import select

from aimesh_tasks.db import AgentRow, session_scope
from aimesh_tasks.db.models import RateLimitRow
from aimesh_tasks.errors import InvalidInput, NotFound
from aimesh_tasks.governance.version import bump_version
from aimesh_tasks.messages import utcnow

MINUTE_S, DAY_S = 60, 86400


@dataclass(frozen=True, slots=True)
class Window:
    """One moving window of a rate limit; None is no limit on that count."""

    window_s: int
    max_requests: int | None
    max_tokens: int | None


@dataclass(frozen=True, slots=True)
class RateLimit:
    """An agent's limits (None: no limit of that kind)."""

    agent_id: str
    requests_per_minute: int | None = None
    tokens_per_minute: int | None = None
    requests_per_day: int | None = None
    tokens_per_day: int | None = None

    @property
    def windows(self) -> list[Window]:
        """The windows that limit something, minute first."""
        every = [Window(MINUTE_S, self.requests_per_minute, self.tokens_per_minute),
                 Window(DAY_S, self.requests_per_day, self.tokens_per_day)]
        return [w for w in every if w.max_requests is not None or w.max_tokens is not None]

    @property
    def limits_tokens(self) -> bool:
        """True if any window counts tokens (settled usage then corrects the count)."""
        return any(w.max_tokens is not None for w in self.windows)

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe dict."""
        return {f.name: getattr(self, f.name) for f in fields(self)}


LIMIT_NAMES = tuple(f.name for f in fields(RateLimit) if f.name != "agent_id")


def _to_limit(row: RateLimitRow) -> RateLimit:
    return RateLimit(row.agent_id, row.requests_per_minute, row.tokens_per_minute,
                     row.requests_per_day, row.tokens_per_day)


def list_rate_limits() -> list[RateLimit]:
    """Every agent's rate limits, ordered by agent id."""
    with session_scope() as session:
        rows = session.scalars(select(RateLimitRow).order_by(RateLimitRow.agent_id))
        return [_to_limit(r) for r in rows]


def write_rate_limit(session: Any, limit: RateLimit) -> None:
    """Upsert one agent's limits in an open session (InvalidInput if not registered)."""
    if session.get(AgentRow, limit.agent_id) is None:
        raise InvalidInput(
            f"rate_limits.{limit.agent_id}: agent '{limit.agent_id}' is not registered; add "
            f"it with `aimesh agents add {limit.agent_id}`",
            field=f"rate_limits.{limit.agent_id}", value=limit.agent_id, errors=[])
    session.merge(RateLimitRow(**limit.to_dict(), updated_at=utcnow()))


def set_rate_limit(limit: RateLimit) -> RateLimit:
    """Set an agent's limits (replacing any it had)."""
    if not limit.windows:
        raise InvalidInput(f"rate_limits.{limit.agent_id}: give at least one of "
                           f"{', '.join(LIMIT_NAMES)}", field=f"rate_limits.{limit.agent_id}",
                           errors=[])
    with session_scope() as session:
        write_rate_limit(session, limit)
    bump_version()
    return limit


def remove_rate_limit(agent_id: str) -> None:
    """Remove an agent's limits; NotFound if it had none."""
    with session_scope() as session:
        row = session.get(RateLimitRow, agent_id)
        if row is None:
            raise NotFound(f"agent '{agent_id}' has no rate limits", kind="rate_limit",
                           id=agent_id)
        session.delete(row)
    bump_version()
