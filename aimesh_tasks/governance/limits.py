"""Rate limits in the database: requests and tokens per second, minute and day, for an
agent or for one ingress API key, and what happens to a message over them.

An agent's limits are applied from the `rate_limits` section of a routes file or with
`set_rate_limit`; an API key's with `aimesh keys create/set-limits` (api_keys.py). Both
apply to a message sent with a key: the key's limits never replace its agent's. Each limit
says what a message over it gets (`on_excess`): `refuse` (RateLimited, 429 at the ingress)
or `queue` (it waits in the routing queue for the next free slot; its producer just waits
longer). Enforced, shared by every worker, by the rate-limit policy
(governance/rate_limit.py).
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, Final, Literal, get_args

from sqlalchemy import or_, select

from aimesh_tasks.db import AgentRow, session_scope
from aimesh_tasks.db.models import IngressKeyRow, RateLimitRow
from aimesh_tasks.errors import InvalidInput, NotFound
from aimesh_tasks.governance.version import bump_version
from aimesh_tasks.messages import utcnow

SECOND_S, MINUTE_S, DAY_S = 1, 60, 86400
OnExcess = Literal["refuse", "queue"]
ON_EXCESS: Final[tuple[str, ...]] = get_args(OnExcess)
# The counts a limit may set (each None: no limit of that kind).
LIMIT_NAMES: Final = ("requests_per_second", "requests_per_minute", "tokens_per_minute",
                      "requests_per_day", "tokens_per_day")


@dataclass(frozen=True, slots=True)
class Window:
    """One moving window of a rate limit; None is no limit on that count."""

    window_s: int
    max_requests: int | None
    max_tokens: int | None


@dataclass(frozen=True, slots=True)
class RateLimit:
    """The limits of an agent, or of one of its API keys (`api_key`: the key's prefix).

    | field               | meaning                                              |
    |---------------------|------------------------------------------------------|
    | requests_per_second | messages admitted in any moving second (bursts)      |
    | requests_per_minute | messages in any moving minute                        |
    | tokens_per_minute   | tokens (estimate at admission, settled usage after)  |
    | requests_per_day    | messages in any moving day                           |
    | tokens_per_day      | tokens in any moving day                             |
    | on_excess           | 'refuse' (RateLimited) or 'queue' (wait for a slot)  |
    """

    agent_id: str
    requests_per_minute: int | None = None
    tokens_per_minute: int | None = None
    requests_per_day: int | None = None
    tokens_per_day: int | None = None
    requests_per_second: int | None = None
    on_excess: OnExcess = "refuse"
    api_key: str | None = None

    @property
    def windows(self) -> list[Window]:
        """The windows that limit something, shortest first."""
        every = [Window(SECOND_S, self.requests_per_second, None),
                 Window(MINUTE_S, self.requests_per_minute, self.tokens_per_minute),
                 Window(DAY_S, self.requests_per_day, self.tokens_per_day)]
        return [w for w in every if w.max_requests is not None or w.max_tokens is not None]

    @property
    def subject(self) -> str:
        """Whose counters these are: 'agent:<id>' or 'key:<prefix>'."""
        return f"key:{self.api_key}" if self.api_key else f"agent:{self.agent_id}"

    @property
    def limits_tokens(self) -> bool:
        """True if any window counts tokens (settled usage then corrects the count)."""
        return any(w.max_tokens is not None for w in self.windows)

    def counts(self) -> dict[str, int | None]:
        """The five counts by name."""
        return {name: getattr(self, name) for name in LIMIT_NAMES}

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe dict."""
        return {f.name: getattr(self, f.name) for f in fields(self)}


def check_limit(limit: RateLimit, where: str) -> RateLimit:
    """The limit unchanged, or InvalidInput (naming `where`) when it limits nothing, has
    a count below 1, or an unknown `on_excess`."""
    if not limit.windows:
        raise InvalidInput(f"{where}: give at least one of {', '.join(LIMIT_NAMES)}",
                           field=where, errors=[])
    for name, value in limit.counts().items():
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                                  or value < 1):
            raise InvalidInput(f"{where}.{name}: must be a whole number >= 1, got {value!r}",
                               field=f"{where}.{name}", errors=[])
    if limit.on_excess not in ON_EXCESS:
        raise InvalidInput(f"{where}.on_excess: must be one of {', '.join(ON_EXCESS)}, got "
                           f"{limit.on_excess!r}", field=f"{where}.on_excess", errors=[])
    return limit


def _to_limit(row: RateLimitRow) -> RateLimit:
    return RateLimit(row.agent_id, row.requests_per_minute, row.tokens_per_minute,
                     row.requests_per_day, row.tokens_per_day, row.requests_per_second,
                     _mode(row.on_excess))


def _mode(value: str | None) -> OnExcess:
    return "queue" if value == "queue" else "refuse"


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
    session.merge(RateLimitRow(agent_id=limit.agent_id, **limit.counts(),
                               on_excess=limit.on_excess, updated_at=utcnow()))


def set_rate_limit(limit: RateLimit) -> RateLimit:
    """Set an agent's limits (replacing any it had)."""
    check_limit(limit, f"rate_limits.{limit.agent_id}")
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


def key_limit_of(row: IngressKeyRow) -> RateLimit | None:
    """The limits kept on an API key's row (None: it has none)."""
    limit = RateLimit(row.agent_id, row.requests_per_minute, row.tokens_per_minute,
                      row.requests_per_day, row.tokens_per_day, row.requests_per_second,
                      _mode(row.on_excess), api_key=row.prefix)
    return limit if limit.windows else None


def write_key_limit(row: IngressKeyRow, limit: RateLimit | None) -> None:
    """Put an API key's limits on its row (None: clear them); the caller commits, then
    bumps the governance version."""
    counts = limit.counts() if limit is not None else dict.fromkeys(LIMIT_NAMES)
    for name, value in counts.items():
        setattr(row, name, value)
    row.on_excess = limit.on_excess if limit is not None else "refuse"


def list_key_limits() -> list[RateLimit]:
    """The limits of every API key that has some, by prefix (a revoked key's too: the
    messages sent with it before still count against them)."""
    query = (select(IngressKeyRow).where(or_(
        *(getattr(IngressKeyRow, name).is_not(None) for name in LIMIT_NAMES)))
        .order_by(IngressKeyRow.prefix))
    with session_scope() as session:
        return [limit for row in session.scalars(query)
                if (limit := key_limit_of(row)) is not None]
