"""Figures over recorded traffic: per endpoint and per agent, and what other policies cost.

Computed from the database only (call attempts, routing decisions, audit events; the
outbox is flushed first), so a report always agrees with what was recorded.

| figure            | from                                                              |
|-------------------|-------------------------------------------------------------------|
| answered          | messages with a successful call attempt                           |
| failed            | messages with an audit `failed` event (all endpoints failed, or   |
|                   | no endpoint could take them: `unroutable`) and no `denied` one    |
| budget rejections | messages a budget refused (audit `denied`) that no call answered  |
| fallbacks         | answered messages that had a failed attempt first                 |
| failed calls      | failed call attempts (per endpoint)                               |
| tokens, cost      | summed over call attempts                                         |
| p50/p99 ms        | latency of the successful calls                                   |
| round-robin       | each answered message's tokens priced at the next endpoint, in a  |
|                   | fixed cycle, among those its routing decision found eligible      |
| always-cheapest   | the same tokens at the cheapest eligible endpoint                 |

Both alternatives assume the same token counts everywhere and price them as the routing
decision saw its candidates at the time (their prices are recorded with it), so a report
does not change when endpoints are repriced or removed later. Decisions recorded before
prices were fall back to the registry's prices; an endpoint priced by neither counts at
what was actually paid.

Each message is counted under one outcome, so answered, failed and refused add up to what
was sent: a message whose fallback a budget refused has both a `denied` and a `failed`
event and counts as refused; a message whose hedge a budget refused while its first call
answered counts as answered.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import Select, select

from aimesh_tasks import outbox
from aimesh_tasks.db import (
    AuditRow,
    CallAttemptRow,
    LedgerRow,
    RoutingDecisionRow,
    session_scope,
)
from aimesh_tasks.errors import NotFound
from aimesh_tasks.money import call_cost_nusd, nusd_to_usd
from aimesh_tasks.registry.endpoints import Endpoint, list_endpoints

DRAIN_TIMEOUT_S = 10.0


def percentile(values: list[float], q: float) -> float | None:
    """Nearest-rank q-quantile (0 < q ≤ 1), None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    rank = math.ceil(round(q * len(ordered), 9))  # round: 0.99 * 100 is 99.00000000000001
    return ordered[min(max(rank, 1), len(ordered)) - 1]


@dataclass
class Usage:
    """Tokens, cost and successful-call latencies of a set of call attempts."""

    input_tokens: int = 0
    output_tokens: int = 0
    cost_nusd: int = 0
    latencies_ms: list[float] = field(default_factory=list)

    def add(self, row: CallAttemptRow) -> None:
        """Count one call attempt."""
        self.input_tokens += row.input_tokens
        self.output_tokens += row.output_tokens
        self.cost_nusd += row.cost_nusd
        if row.ok:
            self.latencies_ms.append(row.latency_ms)

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe usage with p50/p99 latency."""
        return {
            "input_tokens": self.input_tokens,
            "output_tokens": self.output_tokens,
            "cost_usd": str(nusd_to_usd(self.cost_nusd)),
            "p50_ms": percentile(self.latencies_ms, 0.5),
            "p99_ms": percentile(self.latencies_ms, 0.99),
        }


@dataclass
class EndpointFigures(Usage):
    """One endpoint: successful and failed calls."""

    answered: int = 0
    failed_calls: int = 0

    def add(self, row: CallAttemptRow) -> None:
        """Count one call attempt at this endpoint."""
        super().add(row)
        if row.ok:
            self.answered += 1
        else:
            self.failed_calls += 1

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe figures."""
        return {"answered": self.answered, "failed_calls": self.failed_calls,
                **super().to_dict()}


@dataclass
class AgentFigures(Usage):
    """One agent (or the total): messages answered, failed, answered after a fallback,
    refused by a budget; each message under one of answered, refused, failed."""

    answered: set[str] = field(default_factory=set)
    failed_first: set[str] = field(default_factory=set)
    failed: set[str] = field(default_factory=set)
    denied: set[str] = field(default_factory=set)
    unroutable: int = 0

    def add(self, row: CallAttemptRow) -> None:
        """Count one call attempt of this agent."""
        super().add(row)
        (self.answered if row.ok else self.failed_first).add(row.message_id)

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe figures."""
        return {
            "answered": len(self.answered),
            "failed": len(self.failed - self.denied - self.answered),
            "budget_rejections": len(self.denied - self.answered),
            "unroutable": self.unroutable,
            "fallbacks": len(self.answered & self.failed_first),
            **super().to_dict(),
        }


Price = tuple[int, int]  # nano-USD per 1k input tokens, per 1k output tokens


@dataclass(frozen=True)
class Records:
    """The recorded rows a report is computed from."""

    attempts: list[CallAttemptRow]
    routes: dict[str, list[str]]  # message id -> eligible endpoints (winner, fallbacks)
    failed: list[tuple[str, str]]  # (agent id, message id) of audit 'failed' events
    unroutable: list[str]  # agent id per routing decision without a winner
    # message id -> endpoint id -> its prices as the routing decision recorded them
    prices: dict[str, dict[str, Price]] = field(default_factory=dict)
    denied: list[tuple[str, str]] = field(default_factory=list)  # audit 'denied' events


def recorded_prices(candidates: list[dict[str, Any]]) -> dict[str, Price]:
    """The prices a decision recorded per candidate (none for older decisions)."""
    return {c["endpoint_id"]: (int(c["input_nusd_per_1k"]), int(c["output_nusd_per_1k"]))
            for c in candidates if "input_nusd_per_1k" in c and "output_nusd_per_1k" in c}


def _filtered(query: Select[Any], model: Any, since: datetime | None,
              agent_id: str | None) -> Select[Any]:
    if since is not None:
        query = query.where(model.created_at >= since)
    if agent_id is not None:
        query = query.where(model.agent_id == agent_id)
    return query


def load_records(since: datetime | None = None, agent_id: str | None = None) -> Records:
    """Every recorded attempt, decision and failure in the window (outbox drained first)."""
    outbox.flush(wait_s=DRAIN_TIMEOUT_S)
    with session_scope() as session:
        attempts = list(session.scalars(_filtered(
            select(CallAttemptRow).order_by(CallAttemptRow.id), CallAttemptRow, since,
            agent_id)))
        routes: dict[str, list[str]] = {}
        prices: dict[str, dict[str, Price]] = {}
        unroutable: list[str] = []
        for d in session.scalars(_filtered(
                select(RoutingDecisionRow).order_by(RoutingDecisionRow.id), RoutingDecisionRow,
                since, agent_id)):
            if d.winner is None:
                unroutable.append(d.agent_id)
            elif d.message_id not in routes:
                routes[d.message_id] = [d.winner, *d.fallbacks]
                prices[d.message_id] = recorded_prices(d.candidates)
        events: dict[str, list[tuple[str, str]]] = {"failed": [], "denied": []}
        for a in session.scalars(_filtered(
                select(AuditRow).where(AuditRow.event.in_(events)), AuditRow, since, agent_id)):
            events[a.event].append((a.agent_id, a.message_id))
    return Records(attempts, routes, events["failed"], unroutable, prices, events["denied"])


def _cost_at(row: CallAttemptRow, price: Price) -> int:
    return call_cost_nusd(row.input_tokens, row.output_tokens, price[0], price[1])


def _eligible(records: Records, row: CallAttemptRow, registry: dict[str, Price]
              ) -> dict[str, Price]:
    """The endpoints that could have answered this message, with the prices it saw."""
    seen = records.prices.get(row.message_id, {})
    eligible = {}
    for endpoint_id in records.routes.get(row.message_id, [row.endpoint_id]):
        price = seen.get(endpoint_id) or registry.get(endpoint_id)
        if price is not None:
            eligible[endpoint_id] = price
    return eligible


def policy_costs(records: Records, endpoints: Iterable[Endpoint]) -> dict[str, int]:
    """Nano-USD paid as routed, and under round-robin and always-cheapest (see module doc)."""
    registry = {e.id: (e.input_nusd_per_1k, e.output_nusd_per_1k) for e in endpoints}
    cycle = sorted(set(registry).union(*(p.keys() for p in records.prices.values())))
    turn = 0
    round_robin = cheapest = 0
    for row in (r for r in records.attempts if r.ok):
        eligible = _eligible(records, row, registry)
        if not eligible:
            round_robin += row.cost_nusd
            cheapest += row.cost_nusd
            continue
        while cycle[turn % len(cycle)] not in eligible:
            turn += 1
        round_robin += _cost_at(row, eligible[cycle[turn % len(cycle)]])
        turn += 1
        cheapest += min(_cost_at(row, price) for price in eligible.values())
    routed = sum(r.cost_nusd for r in records.attempts)
    return {"routed_nusd": routed, "round_robin_nusd": round_robin, "cheapest_nusd": cheapest}


def tally(records: Records) -> tuple[dict[str, EndpointFigures], dict[str, AgentFigures],
                                     AgentFigures]:
    """Figures per endpoint, per agent and in all, from the recorded rows."""
    by_endpoint: dict[str, EndpointFigures] = {}
    by_agent: dict[str, AgentFigures] = {}
    total = AgentFigures()
    for row in records.attempts:
        by_endpoint.setdefault(row.endpoint_id, EndpointFigures()).add(row)
        by_agent.setdefault(row.agent_id, AgentFigures()).add(row)
        total.add(row)
    for agent_id, message_id in records.failed:
        by_agent.setdefault(agent_id, AgentFigures()).failed.add(message_id)
        total.failed.add(message_id)
    for agent_id, message_id in records.denied:
        by_agent.setdefault(agent_id, AgentFigures()).denied.add(message_id)
        total.denied.add(message_id)
    for agent_id in records.unroutable:
        by_agent.setdefault(agent_id, AgentFigures()).unroutable += 1
        total.unroutable += 1
    return by_endpoint, by_agent, total


def cache_savings(since: datetime | None, agent_id: str | None) -> dict[str, Any]:
    """Messages answered without a call (cache, single-flight) and what that saved, from
    the audit records."""
    with session_scope() as session:
        cached = list(session.scalars(_filtered(
            select(AuditRow).where(AuditRow.event == "cached"), AuditRow, since, agent_id)))
    by_reason: dict[str, int] = {"exact": 0, "semantic": 0, "single_flight": 0}
    for row in cached:
        by_reason[row.reason or "exact"] = by_reason.get(row.reason or "exact", 0) + 1
    saved = sum(int(row.detail.get("cost_saved_nusd", 0)) for row in cached)
    return {"answers": len({r.message_id for r in cached}), **by_reason,
            "saved_usd": str(nusd_to_usd(saved))}


def traffic_report(since: datetime | None = None, agent_id: str | None = None) -> dict[str, Any]:
    """Per-endpoint and per-agent figures, totals, the cost of other routing policies,
    cache savings and budget refusals."""
    records = load_records(since, agent_id)
    by_endpoint, by_agent, total = tally(records)
    costs = policy_costs(records, list_endpoints())
    totals = total.to_dict()
    return {
        "since": since.isoformat() if since else None,
        "agent_id": agent_id,
        "endpoints": {k: g.to_dict() for k, g in sorted(by_endpoint.items())},
        "agents": {k: g.to_dict() for k, g in sorted(by_agent.items())},
        "total": totals,
        "routed_cost_usd": str(nusd_to_usd(costs["routed_nusd"])),
        "round_robin_cost_usd": str(nusd_to_usd(costs["round_robin_nusd"])),
        "cheapest_cost_usd": str(nusd_to_usd(costs["cheapest_nusd"])),
        "cache": cache_savings(since, agent_id),
        "budget_rejections": totals["budget_rejections"],
    }


def _when(moment: datetime | None) -> str | None:
    return moment.isoformat() if moment else None


def message_record(message_id: str) -> dict[str, Any]:
    """What the database holds on one message: its audit trail, routing decisions, call
    attempts and what its agent was charged (NotFound if nothing at all)."""
    outbox.flush(wait_s=DRAIN_TIMEOUT_S)
    with session_scope() as session:
        def rows(model: Any) -> list[Any]:
            return list(session.scalars(select(model).where(model.message_id == message_id)
                                        .order_by(model.id)))

        audit, decisions, attempts, charges = (rows(AuditRow), rows(RoutingDecisionRow),
                                               rows(CallAttemptRow), rows(LedgerRow))
    if not (audit or decisions or attempts):
        raise NotFound(f"no message '{message_id}' is recorded; give an id that `aimesh "
                       "enqueue` printed (or a result's message_id)", kind="message",
                       id=message_id)
    agent = next(r.agent_id for r in [*audit, *decisions, *attempts])
    return {
        "message_id": message_id,
        "agent_id": agent,
        "charged_usd": str(nusd_to_usd(sum(c.nusd for c in charges))),
        "audit": [{"event": a.event, "at": _when(a.created_at), "endpoint_id": a.endpoint_id,
                   "reason": a.reason, "tokens": a.tokens,
                   "cost_usd": str(nusd_to_usd(a.cost_nusd))} for a in audit],
        "decisions": [{"winner": d.winner, "fallbacks": d.fallbacks, "excluded": d.excluded,
                       "error": d.error, "at": _when(d.created_at)} for d in decisions],
        "attempts": [{"endpoint_id": c.endpoint_id, "ok": c.ok, "status": c.status,
                      "latency_ms": round(c.latency_ms, 1), "input_tokens": c.input_tokens,
                      "output_tokens": c.output_tokens,
                      "cost_usd": str(nusd_to_usd(c.cost_nusd)), "error": c.error,
                      "at": _when(c.created_at)} for c in attempts],
    }
