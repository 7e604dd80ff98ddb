"""Failpoints: named places on the message path where a test can pause a worker.

With AIMESH_FAILPOINTS="after_reserve@kill-agent=20,before_settle@other-agent=20", the
first message of agent `kill-agent` to reach `after_reserve` writes its process id to
Redis (keys.failpoint(name)) and sleeps 20 s, so a test can SIGKILL it exactly there;
later arrivals pass (the point fires once per Redis key). Unset, the default, a
failpoint costs one dict lookup.
"""

from __future__ import annotations

import os
import time
from functools import lru_cache

from aimesh_tasks import keys
from aimesh_tasks.redis_client import get_redis
from aimesh_tasks.settings import get_settings


@lru_cache(maxsize=1)
def _pauses(spec: str) -> dict[tuple[str, str], float]:
    pauses = {}
    for item in filter(None, spec.split(",")):
        where, _, seconds = item.partition("=")
        name, _, agent_id = where.partition("@")
        pauses[(name.strip(), agent_id.strip())] = float(seconds)
    return pauses


def failpoint(name: str, agent_id: str) -> None:
    """Pause here once if AIMESH_FAILPOINTS names this point for this agent."""
    seconds = _pauses(get_settings().failpoints).get((name, agent_id))
    if seconds and get_redis().set(keys.failpoint(name), os.getpid(), nx=True, ex=3600):
        time.sleep(seconds)
