"""Set and read agents' budgets (the Python side of `aimesh budgets set|show`)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import Any

from sqlalchemy import select

from aimesh_tasks.budgets.metered import add_metered
from aimesh_tasks.budgets.periods import PERIODS, current_period_start
from aimesh_tasks.db import AgentRow, BudgetRow, session_scope
from aimesh_tasks.errors import InvalidInput, NotFound
from aimesh_tasks.messages import utcnow
from aimesh_tasks.money import nusd_to_usd, usd_to_nusd


@dataclass(frozen=True)
class BudgetView:
    """An agent's budget and where it stands."""

    agent_id: str
    token_limit: int | None
    usd_limit: Decimal | None
    period: str
    rolling_s: int | None
    period_start: datetime
    expires_at: datetime | None
    spent_tokens: int
    spent_usd: Decimal
    reserved_tokens: int
    reserved_usd: Decimal

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe dict (money as decimal strings)."""
        return {
            "agent_id": self.agent_id,
            "token_limit": self.token_limit,
            "usd_limit": None if self.usd_limit is None else str(self.usd_limit),
            "period": self.period,
            "rolling_s": self.rolling_s,
            "period_start": self.period_start.isoformat(),
            "expires_at": self.expires_at.isoformat() if self.expires_at else None,
            "spent_tokens": self.spent_tokens,
            "spent_usd": str(self.spent_usd),
            "reserved_tokens": self.reserved_tokens,
            "reserved_usd": str(self.reserved_usd),
        }


def _view(row: BudgetRow) -> BudgetView:
    return BudgetView(
        agent_id=row.agent_id, token_limit=row.token_limit,
        usd_limit=None if row.usd_limit_nusd is None else nusd_to_usd(row.usd_limit_nusd),
        period=row.period, rolling_s=row.rolling_s, period_start=row.period_start,
        expires_at=row.expires_at, spent_tokens=row.spent_tokens,
        spent_usd=nusd_to_usd(row.spent_nusd), reserved_tokens=row.reserved_tokens,
        reserved_usd=nusd_to_usd(row.reserved_nusd),
    )


def _invalid(field: str, reason: str) -> InvalidInput:
    return InvalidInput(f"{field}: {reason}", field=field, errors=[])


def _token_limit(tokens: Any) -> int | None:
    if tokens is None:
        return None
    if isinstance(tokens, bool) or not isinstance(tokens, int | str):
        raise _invalid("tokens", f"{tokens!r} is not a whole number of tokens")
    try:
        value = int(tokens)
    except ValueError:
        raise _invalid("tokens", f"{tokens!r} is not a whole number of tokens") from None
    if value < 0:
        raise _invalid("tokens", f"must be 0 or more, got {value}")
    return value


def _usd_limit(usd: Any) -> int | None:
    if usd is None:
        return None
    try:
        return usd_to_nusd(usd, field="usd")
    except ValueError as exc:
        raise _invalid("usd", str(exc).removeprefix("usd: ")) from None


LIMITS = ("tokens", "usd", "expires")  # what `clear` may name


def _check_period(period: str, rolling_s: int | None) -> None:
    if period not in PERIODS:
        raise _invalid("period", f"'{period}' is not one of {', '.join(PERIODS)}")
    if period == "rolling" and (rolling_s is None or rolling_s <= 0):
        raise _invalid("rolling_s", "a rolling period needs its length in seconds (> 0)")


@dataclass(frozen=True)
class _Change:
    """What one set_budget call gives; None = keep what the budget has."""

    token_limit: int | None
    usd_limit: int | None
    period: str | None
    rolling_s: int | None
    expires_at: datetime | None
    clear: frozenset[str]

    def nothing(self) -> bool:
        return (self.token_limit is None and self.usd_limit is None and self.period is None
                and self.rolling_s is None and self.expires_at is None and not self.clear)


def _apply(row: BudgetRow, change: _Change, now: datetime) -> None:
    """Change only what was given (or cleared); a new period starts if the period changed."""
    if change.token_limit is not None or "tokens" in change.clear:
        row.token_limit = change.token_limit
    if change.usd_limit is not None or "usd" in change.clear:
        row.usd_limit_nusd = change.usd_limit
    if change.expires_at is not None or "expires" in change.clear:
        row.expires_at = change.expires_at
    period = change.period or row.period
    rolling_s = change.rolling_s if change.rolling_s is not None or change.period else (
        row.rolling_s)
    _check_period(period, rolling_s)
    if row.token_limit is None and row.usd_limit_nusd is None:
        raise _invalid("tokens", "a budget needs a limit: give a token limit, a USD limit, "
                                 "or both (clearing both would leave nothing to enforce)")
    if period != row.period or rolling_s != row.rolling_s:
        row.period_start = current_period_start(period, now, now, rolling_s)
    row.period, row.rolling_s, row.updated_at = period, rolling_s, now


def set_budget(
    agent_id: str,
    *,
    tokens: int | str | None = None,
    usd: Decimal | str | None = None,
    period: str | None = None,
    rolling_s: int | None = None,
    expires_at: datetime | None = None,
    clear: tuple[str, ...] | frozenset[str] = (),
) -> BudgetView:
    """Create an agent's budget, or change only what is given (None keeps the current
    value; `clear` removes the named limits: 'tokens', 'usd', 'expires'). Spent and
    reserved amounts are kept; a new budget's period defaults to 'none'."""
    unknown = set(clear) - set(LIMITS)
    if unknown:
        raise _invalid("clear", f"{sorted(unknown)} are not limits; clear one of "
                                f"{', '.join(LIMITS)}")
    change = _Change(_token_limit(tokens), _usd_limit(usd), period, rolling_s, expires_at,
                     frozenset(clear))
    if change.nothing():
        raise _invalid("tokens", "nothing to change: give a token limit, a USD limit, or both")
    now = utcnow()
    with session_scope() as session:
        if session.get(AgentRow, agent_id) is None:
            raise NotFound(f"agent '{agent_id}' is not registered; add it with "
                           "`aimesh agents add`", kind="agent", id=agent_id)
        row = session.get(BudgetRow, agent_id, with_for_update=True)
        if row is None:
            row = BudgetRow(agent_id=agent_id, token_limit=None, usd_limit_nusd=None,
                            period="none", rolling_s=None, expires_at=None, spent_tokens=0,
                            spent_nusd=0, reserved_tokens=0, reserved_nusd=0,
                            period_start=now)
            session.add(row)
        _apply(row, change, now)
        session.flush()
        view = _view(row)
    add_metered(agent_id)
    return view


def get_budget(agent_id: str) -> BudgetView:
    """An agent's budget, or NotFound."""
    with session_scope() as session:
        row = session.get(BudgetRow, agent_id)
        if row is None:
            raise NotFound(f"agent '{agent_id}' has no budget; set one with "
                           "`aimesh budgets set`", kind="budget", id=agent_id)
        return _view(row)


def list_budgets() -> list[BudgetView]:
    """Every budget, by agent id."""
    with session_scope() as session:
        return [_view(r) for r in session.scalars(select(BudgetRow).order_by(BudgetRow.agent_id))]
