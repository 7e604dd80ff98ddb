"""Budget periods (pure): when the current period started, so a reset can be recorded."""

from __future__ import annotations

from datetime import datetime, timedelta

PERIODS = ("none", "daily", "monthly", "rolling")


def current_period_start(
    period: str, period_start: datetime, now: datetime, rolling_s: int | None = None
) -> datetime:
    """Start of the period `now` falls in (UTC calendar days and months; rolling windows
    counted from the budget's first period start)."""
    if period == "none":
        return period_start
    if period == "daily":
        return now.replace(hour=0, minute=0, second=0, microsecond=0)
    if period == "monthly":
        return now.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
    if period == "rolling":
        if not rolling_s or rolling_s <= 0:
            raise ValueError("rolling_s: a rolling period needs a length in seconds above 0")
        elapsed = max(0.0, (now - period_start).total_seconds())
        return period_start + timedelta(seconds=int(elapsed // rolling_s) * rolling_s)
    raise ValueError(f"period: '{period}' is not one of {', '.join(PERIODS)}")
