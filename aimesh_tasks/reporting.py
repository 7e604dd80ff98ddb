"""Figures over recorded traffic: per endpoint and per agent, and what other policies cost.

Computed from the database only (call attempts and routing decisions), so a report
always agrees with what was recorded.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import select

from aimesh_tasks import outbox
from aimesh_tasks.db import CallAttemptRow, RoutingDecisionRow, session_scope
from aimesh_tasks.money import call_cost_nusd, nusd_to_usd
from aimesh_tasks.registry.endpoints import list_endpoints


def percentile(values: list[float], q: float) -> float | None:
    """Nearest-rank q-quantile (0 < q ≤ 1), None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    rank = math.ceil(round(q * len(ordered), 9))  # round: 0.99 * 100 is 99.00000000000001
    return ordered[min(max(rank, 1), len(ordered)) - 1]


@dataclass
class Group:
    """Figures of one endpoint or agent."""

    messages: int = 0
    failures: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    cost_nusd: int = 0
    latencies_ms: list[float] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe figures with p50/p99 latency."""
        return {
            "messages": self.messages,
            "failures": self.failures,
            "input_tokens": self.input_tokens,
            "output_tokens": self.output_tokens,
            "cost_usd": str(nusd_to_usd(self.cost_nusd)),
            "p50_ms": percentile(self.latencies_ms, 0.5),
            "p99_ms": percentile(self.latencies_ms, 0.99),
        }


def _add(group: Group, row: CallAttemptRow) -> None:
    if row.ok:
        group.messages += 1
        group.input_tokens += row.input_tokens
        group.output_tokens += row.output_tokens
        group.cost_nusd += row.cost_nusd
        group.latencies_ms.append(row.latency_ms)
    else:
        group.failures += 1


def _alternative_costs(rows: list[CallAttemptRow]) -> dict[str, int]:
    """What the successful calls would have cost under round-robin and always-cheapest."""
    endpoints = [e for e in list_endpoints() if e.enabled]
    if not endpoints:
        return {"round_robin_nusd": 0, "cheapest_nusd": 0}
    ok = [r for r in rows if r.ok]
    round_robin = sum(
        call_cost_nusd(r.input_tokens, r.output_tokens, e.input_nusd_per_1k, e.output_nusd_per_1k)
        for r, e in ((r, endpoints[i % len(endpoints)]) for i, r in enumerate(ok))
    )
    cheapest = sum(
        min(call_cost_nusd(r.input_tokens, r.output_tokens, e.input_nusd_per_1k,
                           e.output_nusd_per_1k) for e in endpoints)
        for r in ok
    )
    return {"round_robin_nusd": round_robin, "cheapest_nusd": cheapest}


def traffic_report(since: datetime | None = None, agent_id: str | None = None) -> dict[str, Any]:
    """Per-endpoint and per-agent figures, totals, and the cost of other routing policies."""
    outbox.flush(wait_s=10)
    query = select(CallAttemptRow).order_by(CallAttemptRow.id)
    decisions = select(RoutingDecisionRow.id).where(RoutingDecisionRow.winner.is_(None))
    if since is not None:
        query = query.where(CallAttemptRow.created_at >= since)
        decisions = decisions.where(RoutingDecisionRow.created_at >= since)
    if agent_id is not None:
        query = query.where(CallAttemptRow.agent_id == agent_id)
        decisions = decisions.where(RoutingDecisionRow.agent_id == agent_id)
    with session_scope() as session:
        rows = list(session.scalars(query))
        unroutable = len(list(session.scalars(decisions)))
    by_endpoint: dict[str, Group] = {}
    by_agent: dict[str, Group] = {}
    total = Group()
    for row in rows:
        _add(by_endpoint.setdefault(row.endpoint_id, Group()), row)
        _add(by_agent.setdefault(row.agent_id, Group()), row)
        _add(total, row)
    alternatives = _alternative_costs(rows)
    return {
        "endpoints": {k: g.to_dict() for k, g in sorted(by_endpoint.items())},
        "agents": {k: g.to_dict() for k, g in sorted(by_agent.items())},
        "total": total.to_dict(),
        "unroutable": unroutable,
        "round_robin_cost_usd": str(nusd_to_usd(alternatives["round_robin_nusd"])),
        "cheapest_cost_usd": str(nusd_to_usd(alternatives["cheapest_nusd"])),
    }
