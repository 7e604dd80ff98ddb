"""Counting Redis round trips in this process (a pipeline is one)."""

from __future__ import annotations

from typing import Any

import pytest
import redis


def round_trips(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Count packed sends to Redis from now on (one per round trip, a pipeline is one):
    the list grows by one per send."""
    sent: list[int] = []
    original = redis.connection.Connection.send_packed_command

    def counting(self: Any, command: Any, check_health: bool = True) -> None:
        sent.append(1)
        original(self, command, check_health)

    monkeypatch.setattr(redis.connection.Connection, "send_packed_command", counting)
    return sent
