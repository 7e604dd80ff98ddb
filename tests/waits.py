"""Waiting for an event with a generous bound, failing loudly with what was seen instead.

Tests never assert that something happened within a wall-clock window: they wait for the
event itself, and the bound only turns a hang into a failure that says what was missing.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, TypeVar

import pytest

T = TypeVar("T")
POLL_S = 0.05


def wait_until(probe: Callable[[], T | None], what: str, timeout_s: float = 60,
               seen: Callable[[], Any] | None = None) -> T:
    """Poll `probe` until it returns something other than None or False, and return that;
    after `timeout_s`, fail the test naming `what` and the last thing `seen` (or probed)."""
    deadline = time.monotonic() + timeout_s
    while True:
        found = probe()
        if found is not None and found is not False:
            return found
        if time.monotonic() > deadline:
            last = seen() if seen is not None else found
            pytest.fail(f"waited {timeout_s:g} s for {what}; last seen: {last!r}")
        time.sleep(POLL_S)
