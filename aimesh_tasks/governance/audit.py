"""Audit: one record per decision about a message, written through the outbox.

Events: rejected (invalid message), denied (budget), routed (with scores), cached (an
exact or semantic cache hit, or a single-flight join), completed, failed; later issues
add rate_limited and acl_denied. A record is in Redis before
the task that made the decision is acked, so a killed worker loses none.
"""

from __future__ import annotations

from typing import Any

from aimesh_tasks import outbox
from aimesh_tasks.messages import utcnow
from aimesh_tasks.redis_batch import Batch

EVENTS = frozenset({"rejected", "denied", "routed", "cached", "completed", "failed"})


def audit(
    event: str,
    *,
    message_id: str,
    agent_id: str,
    endpoint_id: str | None = None,
    tokens: int = 0,
    cost_nusd: int = 0,
    reason: str | None = None,
    detail: dict[str, Any] | None = None,
    batch: Batch | None = None,
) -> None:
    """Record one decision (with a batch: when the batch is sent)."""
    if event not in EVENTS:
        raise ValueError(f"unknown audit event '{event}'; known: {', '.join(sorted(EVENTS))}")
    outbox.append(
        "audit",
        {
            "event": event,
            "message_id": message_id[:128],
            "agent_id": agent_id[:64],
            "endpoint_id": endpoint_id,
            "tokens": tokens,
            "cost_nusd": cost_nusd,
            "reason": reason[:512] if reason else None,
            "detail": detail or {},
            "created_at": utcnow(),
        },
        batch=batch,
    )
