"""Default Celery node names for `aimesh worker`: role, queue group and process id.

Celery names every worker `celery@<host>` unless told otherwise, so two workers on one
host (a router and an endpoint worker, say) share a name: Flower shows one of them and
Celery warns `DuplicateNodenameWarning`. `aimesh worker` names each one after what it
consumes and its process id, e.g. `router-4711@host`, `endpoints-4712@host` (for
`--endpoints all`), `ep-sim-fast-4713@host` or `serve-local-llama-4714@host` (for
`--serve`); `-n` still wins.
"""

from __future__ import annotations

import os
import re

MAX_GROUP_CHARS = 40
_UNSAFE = re.compile(r"[^a-z0-9_-]+")


def node_role(router: bool, endpoints: str | None, queues: str | None,
              serves: list[str] | None = None) -> str:
    """What the worker consumes, as a short name: router, endpoints, ep-<ids>,
    serve-<ids>, queues."""
    parts = ["router"] if router else []
    if endpoints == "all":
        parts.append("endpoints")
    elif endpoints:
        ids = [e.strip() for e in endpoints.split(",") if e.strip()]
        parts.append(_group("ep-", ids))
    if serves:
        parts.append(_group("serve-", serves))
    if queues:
        parts.append("queues")
    return "-".join(parts) or "worker"


def _group(prefix: str, ids: list[str]) -> str:
    return _UNSAFE.sub("-", prefix + "-".join(ids).lower())[:MAX_GROUP_CHARS]


def default_node_name(router: bool, endpoints: str | None, queues: str | None,
                      pid: int | None = None, serves: list[str] | None = None) -> str:
    """`<role>-<pid>@%h` (Celery puts the host name in place of %h)."""
    return f"{node_role(router, endpoints, queues, serves)}-{pid or os.getpid()}@%h"
