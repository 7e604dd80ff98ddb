"""Audit: one record per decision about a message, written through the outbox.

A message has at most one record of each event (its row key is derived from the event and
the message id), so a task that runs twice after a redelivery audits once.

Events: rejected (invalid message), denied (a policy refused it: budget, ACL, rate limit,
ambiguous or unmatched route, loop cap; `detail.policy` and the error's `rule` or `limit`
say which check fired), queued (a policy had the message wait in the routing queue, e.g.
for a rate limit's next free slot; its first wait), route_matched (the route a message
resolved to, how, and every route's intent score), routed (with scores, and what policies
noted, e.g. when the rate limiter admitted it), cached (an exact or semantic cache hit, or a
single-flight join), hedged (a hedge of a raced message fired: its lane and call key,
resilience/hedging.py), completed, failed. A record is in Redis before the task that made
the decision is acked, so a killed worker loses none.
"""

from __future__ import annotations

from typing import Any

from blake3 import blake3

from aimesh_tasks import outbox
from aimesh_tasks.messages import utcnow
from aimesh_tasks.redis_batch import Batch

EVENTS = frozenset({"rejected", "denied", "queued", "route_matched", "routed", "cached",
                    "hedged", "completed", "failed"})


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
    """Record one decision (with a batch: when the batch is sent); one per event and
    message (a record without a message id is always kept)."""
    if event not in EVENTS:
        raise ValueError(f"unknown audit event '{event}'; known: {', '.join(sorted(EVENTS))}")
    row_key = (blake3(f"audit|{event}|{message_id}".encode()).hexdigest()[:32]
               if message_id else None)
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
        row_key=row_key,
    )
