"""The governance version: one token in Redis, replaced on every change of routes, agents
or rate limits, so that every process reloads its governance table on its next message."""

from __future__ import annotations

import uuid

from aimesh_tasks import keys
from aimesh_tasks.redis_client import get_redis


def bump_version() -> None:
    """Tell every process that routes, agents or rate limits changed (after the commit)."""
    get_redis().set(keys.governance_version(), uuid.uuid4().hex)
