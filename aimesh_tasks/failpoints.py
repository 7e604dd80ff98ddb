"""Failpoints: named places on the message path where a test can pause a worker.

With AIMESH_FAILPOINTS="after_reserve=5,before_settle=5", a worker reaching a named point
writes its pid to Redis (keys.failpoint(name)) and sleeps that long, so a test can
SIGKILL it exactly there. Unset (the default) a failpoint costs one dict lookup.
"""

from __future__ import annotations

import os
import time
from functools import lru_cache

from aimesh_tasks import keys
from aimesh_tasks.redis_client import get_redis
from aimesh_tasks.settings import get_settings


@lru_cache(maxsize=1)
def _pauses(spec: str) -> dict[str, float]:
    pauses = {}
    for item in filter(None, spec.split(",")):
        name, _, seconds = item.partition("=")
        pauses[name.strip()] = float(seconds)
    return pauses


def failpoint(name: str) -> None:
    """Pause here if AIMESH_FAILPOINTS names this point."""
    seconds = _pauses(get_settings().failpoints).get(name)
    if seconds:
        get_redis().set(keys.failpoint(name), os.getpid(), ex=3600)
        time.sleep(seconds)
