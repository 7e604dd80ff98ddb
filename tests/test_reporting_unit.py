"""What other routing policies would have cost, and how messages are counted (pure): worked
examples, figures by hand."""

from __future__ import annotations

from aimesh_tasks.db import CallAttemptRow
from aimesh_tasks.registry.endpoints import Endpoint
from aimesh_tasks.reporting import Records, policy_costs, tally


def _endpoint(eid: str, input_nusd_per_1k: int) -> Endpoint:
    return Endpoint(id=eid, provider="openai", base_url="http://127.0.0.1:1", model="m",
                    api_key_env=None, input_nusd_per_1k=input_nusd_per_1k,
                    output_nusd_per_1k=2 * input_nusd_per_1k, capacity=10,
                    tags=frozenset(), enabled=True)


def _row(message_id: str, endpoint_id: str, cost_nusd: int, *, ok: bool = True,
         tokens: tuple[int, int] = (1000, 0)) -> CallAttemptRow:
    return CallAttemptRow(message_id=message_id, agent_id="a", endpoint_id=endpoint_id, ok=ok,
                          latency_ms=1.0, input_tokens=tokens[0], output_tokens=tokens[1],
                          cost_nusd=cost_nusd)


def test_round_robin_and_cheapest_on_a_worked_example() -> None:
    # a, b, c cost 1000, 2000, 4000 nano-USD per answer of 1000 input tokens (or of 500
    # input + 250 output tokens: output is priced at twice the input).
    endpoints = [_endpoint("c", 4000), _endpoint("a", 1000), _endpoint("b", 2000)]
    attempts = [
        _row("m1", "c", 0, ok=False),  # a failed first attempt: no answer, costs nothing
        _row("m1", "b", 2000),
        _row("m2", "a", 1000, tokens=(500, 250)),
        _row("m3", "b", 2000),
        _row("m4", "a", 1000),
        _row("m5", "c", 4000),  # no routing decision recorded: only where it was answered
        _row("m6", "gone", 777),  # at an endpoint no longer registered: what was paid
    ]
    routes = {"m1": ["b", "a", "c"], "m2": ["a", "b", "c"], "m3": ["b"], "m4": ["a", "c"],
              "m6": ["gone"]}
    # The cycle is a, b, c (sorted ids); each answer takes the next eligible one:
    # m1 -> a (1000), m2 -> b (2000), m3 skips c and a -> b (2000), m4 -> c (4000),
    # m5 skips a and b -> c (4000), m6 -> what was paid (777): 13777.
    # Cheapest eligible: a 1000, a 1000, b 2000, a 1000, c 4000, 777: 9777.
    # As routed: every attempt's cost, the failed one included: 10777.
    costs = policy_costs(Records(attempts, routes, failed=[], unroutable=[]), endpoints)
    assert costs == {"routed_nusd": 10777, "round_robin_nusd": 13777, "cheapest_nusd": 9777}


def test_each_message_counts_under_one_outcome() -> None:
    attempts = [
        _row("answered", "a", 1000),
        _row("fell", "a", 0, ok=False),  # failed, then a budget refused its fallback
        _row("hedged", "a", 1000),  # answered, while a budget refused its hedge
        _row("lost", "a", 0, ok=False),  # every endpoint failed
    ]
    failed = [("a", "fell"), ("a", "lost"), ("a", "unroutable")]
    denied = [("a", "fell"), ("a", "hedged"), ("a", "refused"), ("a", "refused")]
    _, by_agent, total = tally(Records(attempts, {}, failed, ["a"], denied=denied))
    figures = total.to_dict()
    # answered: answered, hedged; refused: fell, refused; failed: lost, unroutable.
    assert (figures["answered"], figures["budget_rejections"], figures["failed"]) == (2, 2, 2)
    assert by_agent["a"].to_dict() == figures
