"""Budget period arithmetic (pure): `now` is an argument, so no test waits for time to pass."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from aimesh_tasks.budgets.periods import current_period_start

START = datetime(2024, 3, 5, 13, 45, 10, 500, tzinfo=UTC)
HOUR = timedelta(hours=1)


@pytest.mark.parametrize(("period", "now", "expected"), [
    ("none", START + 400 * HOUR, START),
    ("daily", START, datetime(2024, 3, 5, tzinfo=UTC)),
    ("daily", datetime(2024, 3, 6, 0, 0, 0, tzinfo=UTC), datetime(2024, 3, 6, tzinfo=UTC)),
    ("monthly", datetime(2024, 3, 31, 23, 59, 59, tzinfo=UTC), datetime(2024, 3, 1, tzinfo=UTC)),
    ("monthly", datetime(2024, 4, 1, tzinfo=UTC), datetime(2024, 4, 1, tzinfo=UTC)),
])
def test_calendar_periods_start_at_the_utc_day_or_month(
    period: str, now: datetime, expected: datetime
) -> None:
    assert current_period_start(period, START, now) == expected


@pytest.mark.parametrize(("elapsed", "windows"), [
    (timedelta(0), 0),
    (HOUR - timedelta(microseconds=1), 0),  # the last instant of the first window
    (HOUR, 1),  # a window ends exactly at its length
    (1.5 * HOUR, 1),
    (100 * HOUR + timedelta(seconds=1), 100),
    (-HOUR, 0),  # a clock behind the period start never moves it back
])
def test_rolling_windows_are_counted_from_the_first_period_start(
    elapsed: timedelta, windows: int
) -> None:
    assert current_period_start("rolling", START, START + elapsed, 3600) == START + windows * HOUR


@pytest.mark.parametrize(("period", "rolling_s", "words"), [
    ("rolling", None, "rolling_s"),
    ("rolling", 0, "rolling_s"),
    ("weekly", None, "'weekly' is not one of none, daily, monthly, rolling"),
])
def test_bad_periods_name_the_field(period: str, rolling_s: int | None, words: str) -> None:
    with pytest.raises(ValueError, match=words):
        current_period_start(period, START, START, rolling_s)
