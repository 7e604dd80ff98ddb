"""Routing decisions in the database, one row per decision (made or failed)."""

from __future__ import annotations

from typing import Any

from sqlalchemy import select

from aimesh_tasks import outbox
from aimesh_tasks.db import RoutingDecisionRow, session_scope
from aimesh_tasks.messages import utcnow
from aimesh_tasks.redis_batch import Batch


def record_decision(record: dict[str, Any], *, error: str | None = None,
                    batch: Batch | None = None) -> None:
    """Record one routing decision through the outbox (with a batch: when it is sent)."""
    row: outbox.DecisionRecord = {
        "message_id": record["message_id"], "agent_id": record["agent_id"],
        "winner": record["winner"], "fallbacks": record["fallbacks"],
        "candidates": record["candidates"], "excluded": record["excluded"],
        "weights": record["weights"], "error": error, "created_at": utcnow()}
    outbox.append("routing_decision", row, batch=batch)


def decisions_for(message_id: str) -> list[dict[str, Any]]:
    """Every decision recorded for a message, oldest first (the outbox flushed first)."""
    outbox.flush(wait_s=10)
    query = (
        select(RoutingDecisionRow)
        .where(RoutingDecisionRow.message_id == message_id)
        .order_by(RoutingDecisionRow.id)
    )
    with session_scope() as session:
        return [
            {
                "message_id": row.message_id,
                "agent_id": row.agent_id,
                "winner": row.winner,
                "fallbacks": row.fallbacks,
                "candidates": row.candidates,
                "excluded": row.excluded,
                "weights": row.weights,
                "error": row.error,
                "created_at": row.created_at,
            }
            for row in session.scalars(query)
        ]
