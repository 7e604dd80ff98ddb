"""Routing: pure scoring, candidate selection, and the decisions' record."""

from aimesh_tasks.routing.decisions import decisions_for, record_decision
from aimesh_tasks.routing.scoring import CandidateFigures, ScoredCandidate, score_candidates
from aimesh_tasks.routing.selection import RoutingDecision, decide, exclusion_reason

__all__ = [
    "CandidateFigures",
    "RoutingDecision",
    "ScoredCandidate",
    "decide",
    "decisions_for",
    "exclusion_reason",
    "record_decision",
    "score_candidates",
]
