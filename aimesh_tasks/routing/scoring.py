"""Endpoint scoring: pure functions over normalised cost, load and latency (lower wins).

Each component is min-max normalised over the candidate set, so 0 is the best candidate
and 1 the worst on that component; when all candidates are equal it is 0 for all.
score = w_cost·cost + w_load·load + w_latency·latency, with the weights from settings.
An endpoint with no latency yet counts as the fastest known one, so new endpoints get
traffic and thereby figures.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True, slots=True)
class CandidateFigures:
    """The raw figures of one candidate for one message."""

    endpoint_id: str
    cost_nusd: int
    load: float
    latency_ms: float | None


@dataclass(frozen=True, slots=True)
class ScoredCandidate:
    """A candidate with its raw and normalised components and its score."""

    endpoint_id: str
    cost_nusd: int
    load: float
    latency_ms: float | None
    cost_norm: float
    load_norm: float
    latency_norm: float
    score: float

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe dict, as recorded with the routing decision."""
        return {name: getattr(self, name) for name in self.__slots__}  # scalars: shallow


def normalise(values: list[float]) -> list[float]:
    """Min-max normalise to [0, 1]; all-equal values all become 0."""
    low, high = min(values), max(values)
    if high == low:
        return [0.0 for _ in values]
    return [(value - low) / (high - low) for value in values]


def _latencies(candidates: list[CandidateFigures]) -> list[float]:
    known = [c.latency_ms for c in candidates if c.latency_ms is not None]
    fastest = min(known) if known else 0.0
    return [c.latency_ms if c.latency_ms is not None else fastest for c in candidates]


def score_candidates(
    candidates: list[CandidateFigures], weights: tuple[float, float, float]
) -> list[ScoredCandidate]:
    """Score every candidate and rank them best first (ties: cheaper, then by id)."""
    if not candidates:
        return []
    w_cost, w_load, w_latency = weights
    costs = normalise([float(c.cost_nusd) for c in candidates])
    loads = normalise([c.load for c in candidates])
    latencies = normalise(_latencies(candidates))
    scored = [
        ScoredCandidate(
            endpoint_id=c.endpoint_id,
            cost_nusd=c.cost_nusd,
            load=c.load,
            latency_ms=c.latency_ms,
            cost_norm=round(cost, 6),
            load_norm=round(load, 6),
            latency_norm=round(latency, 6),
            score=round(w_cost * cost + w_load * load + w_latency * latency, 6),
        )
        for c, cost, load, latency in zip(candidates, costs, loads, latencies, strict=True)
    ]
    return sorted(scored, key=lambda s: (s.score, s.cost_nusd, s.endpoint_id))
