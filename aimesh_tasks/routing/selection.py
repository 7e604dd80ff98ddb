"""Candidate filtering and the routing decision for one message.

Where "at capacity" (calls in flight >= the endpoint's capacity) matters: an endpoint at
capacity is left out (recorded as such) whenever another candidate has room, so ranking
always prefers an endpoint with room. When every candidate that could serve the message
is at capacity, they are not refused: they are ranked among themselves (their load is in
the score) and the decision is `saturated`, so the message is handed to the best one's
queue and waits there for a worker, up to its deadline, instead of failing with
NoEndpointAvailable. Capacity is what routing plans with; what bounds the calls an
endpoint really has in flight is the concurrency of the workers consuming its queue.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from aimesh_tasks.errors import NoEndpointAvailable
from aimesh_tasks.estimation import estimate_input_tokens
from aimesh_tasks.messages import AiMessage
from aimesh_tasks.money import call_cost_nusd
from aimesh_tasks.registry.endpoints import Endpoint
from aimesh_tasks.registry.live import LiveFigures
from aimesh_tasks.routing.scoring import CandidateFigures, ScoredCandidate, score_candidates


@dataclass(frozen=True)
class RoutingDecision:
    """The ranked candidates for a message (winner first) and why the others were left out."""

    message_id: str
    agent_id: str
    ranked: list[ScoredCandidate]
    excluded: dict[str, str]
    weights: tuple[float, float, float]
    route: list[Endpoint] = field(default_factory=list)
    # Every candidate was at capacity: the message waits in the winner's queue.
    saturated: bool = False

    @property
    def winner(self) -> Endpoint:
        """The endpoint to call first."""
        return self.route[0]

    def to_record(self) -> dict[str, Any]:
        """The row recorded for audit: every candidate's breakdown and prices at the time
        (reports price other policies with them), winner and fallbacks."""
        prices = {e.id: {"input_nusd_per_1k": e.input_nusd_per_1k,
                         "output_nusd_per_1k": e.output_nusd_per_1k} for e in self.route}
        return {
            "message_id": self.message_id,
            "agent_id": self.agent_id,
            "winner": self.ranked[0].endpoint_id if self.ranked else None,
            "fallbacks": [c.endpoint_id for c in self.ranked[1:]],
            "candidates": [{**c.to_dict(), **prices.get(c.endpoint_id, {})}
                           for c in self.ranked],
            "excluded": self.excluded,
            "weights": dict(zip(("cost", "load", "latency"), self.weights, strict=True)),
            "saturated": self.saturated,
        }


def exclusion_reason(
    endpoint: Endpoint, figures: LiveFigures, message: AiMessage, now: float, retry_s: float
) -> str | None:
    """Why an endpoint cannot take this message at all, or None if it can (with room or
    not: see `at_capacity`)."""
    if not endpoint.enabled:
        return "disabled"
    if message.model is not None and message.model != endpoint.model:
        return f"serves model '{endpoint.model}', message asks for '{message.model}'"
    if message.capability is not None and message.capability not in endpoint.tags:
        return f"lacks capability '{message.capability}'"
    if figures.is_down(now, retry_s):
        return f"unhealthy: down since {figures.health_at:.0f}, retried after {retry_s:g}s"
    return None


def at_capacity(endpoint: Endpoint, figures: LiveFigures) -> str | None:
    """Why an endpoint has no room for another call now, or None if it has."""
    if figures.in_flight >= endpoint.capacity:
        return f"at capacity: {figures.in_flight}/{endpoint.capacity} in flight"
    return None


def expected_cost_nusd(endpoint: Endpoint, input_tokens: int, max_tokens: int) -> int:
    """Worst-case cost of the message at this endpoint's prices."""
    return call_cost_nusd(
        input_tokens, max_tokens, endpoint.input_nusd_per_1k, endpoint.output_nusd_per_1k
    )


def decide(
    message: AiMessage,
    endpoints: tuple[Endpoint, ...],
    figures: dict[str, LiveFigures],
    *,
    weights: tuple[float, float, float],
    now: float,
    health_retry_s: float,
) -> RoutingDecision:
    """Filter, score and rank the endpoints for a message; NoEndpointAvailable if none fits
    (endpoints at capacity only count when no candidate has room: the decision is then
    `saturated`)."""
    input_tokens = message.token_estimate or estimate_input_tokens(message.chat())
    excluded: dict[str, str] = {}
    candidates: list[Endpoint] = []
    full: dict[str, str] = {}
    for endpoint in endpoints:
        live = figures.get(endpoint.id, LiveFigures())
        reason = exclusion_reason(endpoint, live, message, now, health_retry_s)
        if reason is not None:
            excluded[endpoint.id] = reason
            continue
        candidates.append(endpoint)
        busy = at_capacity(endpoint, live)
        if busy is not None:
            full[endpoint.id] = busy
    saturated = bool(candidates) and len(full) == len(candidates)
    if not saturated:
        candidates = [e for e in candidates if e.id not in full]
        excluded.update(full)
    ranked = score_candidates(
        [
            CandidateFigures(
                endpoint_id=e.id,
                cost_nusd=expected_cost_nusd(e, input_tokens, message.max_tokens),
                load=figures.get(e.id, LiveFigures()).in_flight / e.capacity,
                latency_ms=figures.get(e.id, LiveFigures()).p50_ms,
            )
            for e in candidates
        ],
        weights,
    )
    by_id = {e.id: e for e in candidates}
    decision = RoutingDecision(
        message_id=message.id,
        agent_id=message.agent_id,
        ranked=ranked,
        excluded=excluded,
        weights=weights,
        route=[by_id[c.endpoint_id] for c in ranked],
        saturated=saturated,
    )
    if not ranked:
        raise NoEndpointAvailable(_no_candidate_message(endpoints, excluded), 
                                  message_id=message.id, excluded=excluded)
    return decision


def _no_candidate_message(endpoints: tuple[Endpoint, ...], excluded: dict[str, str]) -> str:
    if not endpoints:
        return "no endpoint is registered; add one with `aimesh endpoints add`"
    reasons = "; ".join(f"{eid}: {why}" for eid, why in sorted(excluded.items()))
    return f"no endpoint can take this message ({reasons})"
