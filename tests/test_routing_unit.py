"""Scoring and candidate selection (pure; no servers needed)."""

from __future__ import annotations

import pytest

from aimesh_tasks.errors import NoEndpointAvailable
from aimesh_tasks.messages import parse_message
from aimesh_tasks.registry.endpoints import Endpoint
from aimesh_tasks.registry.live import LiveFigures
from aimesh_tasks.routing.scoring import CandidateFigures, normalise, score_candidates
from aimesh_tasks.routing.selection import decide

WEIGHTS = (0.4, 0.3, 0.3)


def _endpoint(eid: str, price: int = 1000, capacity: int = 10, **kw: object) -> Endpoint:
    fields: dict[str, object] = {
        "id": eid, "provider": "openai", "base_url": "http://127.0.0.1:1", "model": "m",
        "api_key_env": None, "input_nusd_per_1k": price, "output_nusd_per_1k": price,
        "capacity": capacity, "tags": frozenset(), "enabled": True,
    }
    fields.update(kw)
    return Endpoint(**fields)  # type: ignore[arg-type]


def test_normalise_maps_min_to_0_and_max_to_1() -> None:
    assert normalise([2.0, 4.0, 3.0]) == [0.0, 1.0, 0.5]
    assert normalise([5.0, 5.0]) == [0.0, 0.0]


def test_cheaper_wins_when_load_and_latency_are_equal() -> None:
    ranked = score_candidates(
        [CandidateFigures("dear", 200, 0.1, 50.0), CandidateFigures("cheap", 100, 0.1, 50.0)],
        WEIGHTS,
    )
    assert [c.endpoint_id for c in ranked] == ["cheap", "dear"]
    assert ranked[1].score == pytest.approx(0.4)


def test_weights_decide_between_cheap_but_loaded_and_dear_but_idle() -> None:
    cheap_loaded = CandidateFigures("cheap", 100, 0.9, 50.0)
    dear_idle = CandidateFigures("dear", 200, 0.0, 50.0)
    assert score_candidates([cheap_loaded, dear_idle], (0.4, 0.3, 0.3))[0].endpoint_id == "cheap"
    assert score_candidates([cheap_loaded, dear_idle], (0.2, 0.6, 0.2))[0].endpoint_id == "dear"


def test_score_is_the_weighted_sum_of_normalised_components() -> None:
    ranked = score_candidates(
        [CandidateFigures("a", 100, 0.5, 10.0), CandidateFigures("b", 300, 0.0, 30.0),
         CandidateFigures("c", 200, 1.0, 20.0)],
        WEIGHTS,
    )
    for c in ranked:
        expected = 0.4 * c.cost_norm + 0.3 * c.load_norm + 0.3 * c.latency_norm
        assert c.score == pytest.approx(expected, abs=1e-6)
    assert {c.endpoint_id: c.cost_norm for c in ranked} == {"a": 0.0, "b": 1.0, "c": 0.5}


def test_unknown_latency_counts_as_the_fastest_known() -> None:
    ranked = score_candidates(
        [CandidateFigures("new", 100, 0.0, None), CandidateFigures("slow", 100, 0.0, 90.0),
         CandidateFigures("fast", 100, 0.0, 10.0)],
        WEIGHTS,
    )
    by_id = {c.endpoint_id: c for c in ranked}
    assert by_id["new"].latency_norm == by_id["fast"].latency_norm == 0.0


MESSAGE = parse_message({"agent_id": "a", "prompt": "hello", "max_tokens": 10})


def test_decide_excludes_disabled_down_full_and_mismatched_with_reasons() -> None:
    endpoints = (
        _endpoint("off", enabled=False),
        _endpoint("down"),
        _endpoint("full", capacity=2),
        _endpoint("other-model", model="x"),
        _endpoint("ok", price=5000),
    )
    figures = {
        "down": LiveFigures(health="down", health_at=1000.0),
        "full": LiveFigures(in_flight=2),
    }
    decision = decide(parse_message({**MESSAGE.to_json_dict(), "model": "m"}), endpoints,
                      figures, weights=WEIGHTS, now=1010.0, health_retry_s=30)
    assert [c.endpoint_id for c in decision.ranked] == ["ok"]
    assert decision.excluded["off"] == "disabled"
    assert decision.excluded["down"].startswith("unhealthy")
    assert decision.excluded["full"] == "at capacity: 2/2 in flight"
    assert "serves model 'x'" in decision.excluded["other-model"]


def test_down_endpoint_is_tried_again_after_the_retry_period() -> None:
    figures = {"down": LiveFigures(health="down", health_at=1000.0)}
    decision = decide(MESSAGE, (_endpoint("down"),), figures, weights=WEIGHTS, now=1031.0,
                      health_retry_s=30)
    assert decision.winner.id == "down"


def test_capability_hint_filters_by_tag() -> None:
    endpoints = (_endpoint("plain"), _endpoint("coder", tags=frozenset({"code"})))
    message = parse_message({**MESSAGE.to_json_dict(), "capability": "code"})
    decision = decide(message, endpoints, {}, weights=WEIGHTS, now=0.0, health_retry_s=30)
    assert decision.winner.id == "coder"
    assert decision.excluded == {"plain": "lacks capability 'code'"}


def test_no_candidate_raises_with_every_reason() -> None:
    with pytest.raises(NoEndpointAvailable) as caught:
        decide(MESSAGE, (_endpoint("off", enabled=False),), {}, weights=WEIGHTS, now=0.0,
               health_retry_s=30)
    assert caught.value.excluded == {"off": "disabled"}
    assert "off: disabled" in str(caught.value)


def test_no_endpoint_registered_says_how_to_add_one() -> None:
    with pytest.raises(NoEndpointAvailable, match="aimesh endpoints add"):
        decide(MESSAGE, (), {}, weights=WEIGHTS, now=0.0, health_retry_s=30)


def test_fallbacks_are_ranked_after_the_winner() -> None:
    endpoints = (_endpoint("c", price=3000), _endpoint("a", price=1000), _endpoint("b", price=2000))
    decision = decide(MESSAGE, endpoints, {}, weights=WEIGHTS, now=0.0, health_retry_s=30)
    record = decision.to_record()
    assert record["winner"] == "a" and record["fallbacks"] == ["b", "c"]
    assert [e.id for e in decision.route] == ["a", "b", "c"]


def test_every_candidate_at_capacity_is_ranked_not_refused_and_the_decision_says_saturated(
) -> None:
    endpoints = (_endpoint("busier", capacity=2), _endpoint("busy", capacity=4),
                 _endpoint("off", enabled=False))
    figures = {"busier": LiveFigures(in_flight=3), "busy": LiveFigures(in_flight=4)}
    decision = decide(MESSAGE, endpoints, figures, weights=WEIGHTS, now=0.0,
                      health_retry_s=30)
    assert decision.saturated and decision.to_record()["saturated"] is True
    assert [e.id for e in decision.route] == ["busy", "busier"]  # the lighter load first
    assert decision.excluded == {"off": "disabled"}
    # One candidate with room is enough: the full ones are left out, as before.
    roomy = decide(MESSAGE, (*endpoints, _endpoint("roomy", price=9000)), figures,
                   weights=WEIGHTS, now=0.0, health_retry_s=30)
    assert not roomy.saturated and [e.id for e in roomy.route] == ["roomy"]
    assert roomy.excluded["busy"] == "at capacity: 4/4 in flight"
