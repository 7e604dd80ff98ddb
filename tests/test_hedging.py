"""Hedged requests (the model race): resilience/hedging.py, pipeline/race.py.

Three kinds of test, on real Redis and Postgres throughout:
- the token bucket's Lua and the race's scripts, step by step, and the policy's pure
  planning with an injected clock (no waiting);
- the message path as plain functions (`routing.route`, `calling.call`) in this process,
  with the policies given explicitly: a hedge that cannot be reserved, an empty hedge
  budget, a race already won, the p95 form;
- end to end through the session's worker processes and simulators scripted per
  endpoint: what happened is read from the simulators' call logs, the ledger and the
  audit, never from how long it took.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from celery.result import AsyncResult
from prometheus_client import REGISTRY
from sqlalchemy import select

from aimesh_tasks import keys, outbox, submit
from aimesh_tasks.app import app
from aimesh_tasks.budgets.estimate import worst_case
from aimesh_tasks.db import AuditRow, CallAttemptRow, LedgerRow, ReservationRow, session_scope
from aimesh_tasks.errors import AllEndpointsFailed, InvalidMessage
from aimesh_tasks.messages import AiMessage, Hedge, parse_message
from aimesh_tasks.pipeline import calling, race, routing
from aimesh_tasks.pipeline.outcomes import AnswerFor, Done, HandOff, Lost
from aimesh_tasks.policies import Policies
from aimesh_tasks.policies.budget import BudgetAdmission
from aimesh_tasks.redis_client import get_redis
from aimesh_tasks.registry import Endpoint
from aimesh_tasks.registry.live import call_finished, call_started
from aimesh_tasks.resilience import hedge_budget
from aimesh_tasks.resilience.hedge_budget import BudgetConfig
from aimesh_tasks.resilience.hedging import Hedging, hedge_delay_ms, hedge_of, plan, too_late
from aimesh_tasks.settings import Settings
from aimesh_tasks.simulator import RunningSimulator
from tests.budget_checks import new_agent
from tests.waits import wait_until

pytestmark = pytest.mark.usefixtures("clean")

Sim = Callable[..., RunningSimulator]
MakeEndpoint = Callable[..., Endpoint]
T0 = datetime(2030, 1, 1, tzinfo=UTC)
BUCKET = BudgetConfig(ratio=0.1, burst=2, window_s=60)


def _message(agent: str, **fields: Any) -> AiMessage:
    return AiMessage(agent_id=agent, prompt=fields.pop("prompt", f"hedge {uuid.uuid4()}"),
                     max_tokens=16, **fields)


def _policies(clock: Callable[[], datetime] | None = None, **settings: Any) -> Policies:
    hedging = (Hedging(Settings(**settings), clock) if clock is not None
               else Hedging(Settings(**settings)))
    return Policies([BudgetAdmission(), hedging])


def _ledger(message_id: str) -> dict[str, LedgerRow]:
    with session_scope() as session:
        rows = session.scalars(select(LedgerRow).where(LedgerRow.message_id == message_id))
        return {row.call_key: row for row in rows}


def _reservation(call_key: str) -> ReservationRow | None:
    with session_scope() as session:
        return session.get(ReservationRow, call_key)


def _hedges_counted(endpoint_id: str, outcome: str) -> float:
    """aimesh_hedges_total{endpoint, outcome} as this process counted it."""
    return REGISTRY.get_sample_value("aimesh_hedges_total",
                                     {"endpoint": endpoint_id, "outcome": outcome}) or 0.0


def _audit(message_id: str) -> dict[str, AuditRow]:
    outbox.flush(wait_s=10)
    with session_scope() as session:
        rows = session.scalars(select(AuditRow).where(AuditRow.message_id == message_id))
        return {row.event: row for row in rows}


def _attempt_rows(message_id: str) -> list[CallAttemptRow]:
    outbox.flush(wait_s=10)
    with session_scope() as session:
        return list(session.scalars(select(CallAttemptRow)
                                    .where(CallAttemptRow.message_id == message_id)))


def _logged(sim: RunningSimulator, call_key: str) -> dict[str, Any] | None:
    return next((c for c in sim.calls() if c["call_key"] == call_key), None)


# --- the bucket, the race and the plan, step by step ---------------------------------


def test_the_hedge_bucket_starts_full_spends_a_token_a_hedge_and_refills_by_calls() -> None:
    endpoint_id = f"bucket-{uuid.uuid4().hex[:6]}"
    assert hedge_budget.tokens(endpoint_id, BUCKET) == 2  # a new bucket holds its burst
    assert [hedge_budget.take(endpoint_id, BUCKET) for _ in range(3)] == [True, True, False]
    assert hedge_budget.tokens(endpoint_id, BUCKET) == 0
    for _ in range(9):  # nine calls routed: 0.9 of a token, not yet a hedge
        hedge_budget.deposit([endpoint_id], BUCKET)
    assert not hedge_budget.take(endpoint_id, BUCKET)
    hedge_budget.deposit([endpoint_id], BUCKET)  # the tenth: one hedge per ten calls
    assert hedge_budget.take(endpoint_id, BUCKET)
    for _ in range(50):
        hedge_budget.deposit([endpoint_id], BUCKET)
    assert hedge_budget.tokens(endpoint_id, BUCKET) == 2  # never past the burst
    assert hedge_budget.take(endpoint_id, BUCKET)
    hedge_budget.refund(endpoint_id, BUCKET)
    assert hedge_budget.tokens(endpoint_id, BUCKET) == 2
    assert 0 < get_redis().ttl(keys.hedge_bucket(endpoint_id)) <= 60


def test_the_race_claims_once_and_the_last_started_call_to_fail_delivers() -> None:
    mid = uuid.uuid4().hex
    assert race.start_hedge(mid, 1)
    assert race.primary_failed(mid, {"code": "provider_error", "message": "a broke"}) == "wait"
    assert race.hedge_failed(mid, 1) == {"code": "provider_error", "message": "a broke"}
    assert race.read(mid) == race.RaceState(None, True, frozenset({1}))
    assert not race.start_hedge(mid, 2)  # closed: a later hedge does not fire

    won = uuid.uuid4().hex
    assert race.start_hedge(won, 1)
    assert race.hedge_failed(won, 1) is None  # the primary still runs: nothing to deliver
    assert race.claim(won, 0) and race.claim(won, 0)  # a redelivered winner finds its lane
    assert not race.claim(won, 1)
    assert race.primary_failed(won, {"code": "x", "message": "late"}) == "lost"
    assert race.read(won).winner == 0

    alone = uuid.uuid4().hex  # a hedge never started holds nothing open
    assert race.primary_failed(alone, {"code": "x", "message": "m"}) == "deliver"


def test_a_dead_lettered_hedge_ends_its_lane_and_delivers_a_waiting_failure() -> None:
    mid = uuid.uuid4().hex
    assert race.start_hedge(mid, 1)
    assert race.primary_failed(mid, {"code": "provider_error", "message": "a broke"}) == "wait"
    assert not race.bury_hedge(app, mid)  # the primary's own task id is no hedge's
    assert race.bury_hedge(app, keys.hedge_call_key(mid, 1))
    assert AsyncResult(mid, app=app).state == "FAILURE"
    assert "a broke" in str(AsyncResult(mid, app=app).result)


def test_the_plan_is_the_next_ranked_endpoints_unless_the_deadline_comes_first() -> None:
    route = [Endpoint(id=n, provider="openai", base_url="http://x", model="m",
                      api_key_env=None, input_nusd_per_1k=1, output_nusd_per_1k=1,
                      capacity=10, tags=frozenset(), enabled=True) for n in ("a", "b", "c")]
    two = Hedge(after_ms=300, max_extra=2)
    assert [(c.endpoint.id, c.countdown_s, c.lane) for c in plan(two, route, 300, None)] == [
        ("b", 0.3, 1), ("c", 0.3, 2)]
    assert [c.endpoint.id for c in plan(Hedge(after_ms=0), route, 0, None)] == ["b"]
    assert plan(two, route, 300, remaining_s=0.3) == []
    assert plan(two, route[:1], 300, None) == []
    assert hedge_delay_ms(Hedge(after="p95"), 420.0, 1000) == 420.0
    assert hedge_delay_ms(Hedge(after="p95"), None, 1000) == 1000
    # A p95 in a slow second mode is capped at 4 p50s, one hugging the median is raised to
    # 1.5 p50s, one between is kept; after_ms is taken as given.
    bounds = (1.5, 4.0)
    assert hedge_delay_ms(Hedge(after="p95"), 2000.0, 1000, 110.0, bounds) == 440.0
    assert hedge_delay_ms(Hedge(after="p95"), 120.0, 1000, 110.0, bounds) == 165.0
    assert hedge_delay_ms(Hedge(after="p95"), 300.0, 1000, 110.0, bounds) == 300.0
    assert hedge_delay_ms(Hedge(after_ms=900), 300.0, 1000, 10.0, bounds) == 900.0
    assert too_late(0.05, 100.0) and not too_late(0.2, 100.0) and not too_late(None, 1e6)


def test_an_agents_default_hedge_applies_unless_the_message_brings_its_own() -> None:
    defaults = Settings(hedge_agents="slow-bot=p95:2,quick=0").hedge_agent_defaults
    assert hedge_of(_message("slow-bot"), defaults) == Hedge(after="p95", max_extra=2)
    own = Hedge(after_ms=50)
    assert hedge_of(_message("slow-bot", hedge=own), defaults) == own
    assert hedge_of(_message("other"), defaults) is None
    assert hedge_of(_message("quick", stream=True), defaults) is None
    with pytest.raises(ValueError, match="AIMESH_HEDGE_AGENTS: 'x=soon'"):
        Settings(hedge_agents="x=soon")


@pytest.mark.parametrize(("hedge", "field", "says"), [
    ({"after_ms": -5}, "hedge.after_ms", "greater than or equal to 0"),
    ({"after": "p99"}, "hedge.after", "'p95'"),
    ({"after_ms": 100, "after": "p95"}, "hedge", "not both or neither"),
    ({}, "hedge", "not both or neither"),
    ({"after_ms": "soon"}, "hedge.after_ms", "valid integer"),
    ({"after_ms": 100, "max_extra": 9}, "hedge.max_extra", "less than or equal to 3"),
    ({"after_ms": 100, "race": True}, "hedge.race", "hedge accepts: after, after_ms"),
])
def test_bad_hedge_input_is_refused_naming_the_field(hedge: dict[str, Any], field: str,
                                                     says: str) -> None:
    with pytest.raises(InvalidMessage) as caught:
        submit(agent_id="hedger", prompt="x", hedge=hedge)
    assert caught.value.fields["field"] == field and says in caught.value.message


def test_a_streaming_message_is_not_hedged() -> None:
    with pytest.raises(InvalidMessage, match="hedge: a streaming message is not hedged"):
        parse_message({"agent_id": "hedger", "prompt": "x", "stream": True,
                       "hedge": {"after_ms": 10}})


# --- the message path as functions ----------------------------------------------------


def _routed(message: AiMessage, policies: Policies) -> HandOff:
    handed = routing.route(app, message, policies=policies)
    assert isinstance(handed, HandOff), handed
    return handed


def test_routing_plans_a_hedge_at_the_next_endpoint_and_the_deadline_can_forbid_it(
    simulator: Sim, endpoint: MakeEndpoint
) -> None:
    sim = simulator()
    first, second = endpoint(sim, "a-first"), endpoint(sim, "b-second", price_in="0.002")
    handed = _routed(_message(new_agent("plan"), hedge=Hedge(after_ms=250)), _policies())
    assert handed.envelope.lane == 0 and handed.envelope.route[0]["id"] == first.id
    [hedge] = handed.hedges
    assert hedge.countdown_s == 0.25 and hedge.envelope.lane == 1
    assert [e["id"] for e in hedge.envelope.route] == [second.id]
    assert hedge.envelope.call_key.endswith(":hedge-1")
    assert hedge_budget.tokens(second.id, BudgetConfig()) == 10  # deposited, capped at burst

    soon = datetime.now(UTC) + timedelta(seconds=30)
    late = _message(new_agent("plan"), hedge=Hedge(after_ms=250), deadline=soon)

    def clock() -> datetime:  # the deadline is 100 ms away: before the hedge would fire
        return soon - timedelta(milliseconds=100)

    unhedged = _routed(late, _policies(clock))
    assert unhedged.hedges == () and unhedged.envelope.lane is None


def test_the_p95_form_waits_the_first_endpoints_live_p95(simulator: Sim,
                                                         endpoint: MakeEndpoint) -> None:
    sim = simulator()
    first = endpoint(sim, "a-p95")
    endpoint(sim, "b-p95", price_in="0.002")
    cold = _routed(_message(new_agent("p95"), hedge=Hedge(after="p95")),
                   _policies(hedge_p95_default_ms=700))
    assert cold.hedges[0].countdown_s == 0.7  # no live p95 yet: the default
    for n, latency_ms in enumerate([100.0] * 18 + [250.0] * 2):
        call_started(first.id, f"seed:{n}")
        call_finished(first.id, f"seed:{n}", latency_ms, True)
    warm = _routed(_message(new_agent("p95"), hedge=Hedge(after="p95")), _policies())
    assert warm.hedges[0].countdown_s == 0.25  # the 19th of 20 sorted latencies
    for n in range(20, 22):  # two at 900 ms: the 21st of 22 sorted is in the slow mode
        call_started(first.id, f"seed:{n}")
        call_finished(first.id, f"seed:{n}", 900.0, True)
    capped = _routed(_message(new_agent("p95"), hedge=Hedge(after="p95")), _policies())
    assert capped.hedges[0].countdown_s == 0.4  # 4 (AIMESH_HEDGE_P95_CAP_X) x the 100 ms p50


def test_a_hedge_whose_worst_case_cannot_be_reserved_is_not_fired(
    simulator: Sim, endpoint: MakeEndpoint
) -> None:
    cheap_sim, dear_sim = simulator(), simulator()
    cheap = endpoint(cheap_sim, "a-cheap", price_in="0.001", price_out="0.001")
    dear = endpoint(dear_sim, "b-dear", price_in="50", price_out="50")
    message = _message(new_agent("poor", usd="0.01"), hedge=Hedge(after_ms=0))
    assert worst_case(message, cheap).nusd < 10**7 < worst_case(message, dear).nusd
    handed = _routed(message, _policies())
    [hedge] = handed.hedges
    outcome = calling.call(app, hedge.envelope, wait_s=5, policies=_policies())
    assert isinstance(outcome, Lost) and "cannot be reserved" in outcome.reason
    assert dear_sim.stats()["calls"] == 0
    held = _reservation(hedge.envelope.call_key)
    assert held is None or held.state == "released"
    assert hedge_budget.tokens(dear.id, BudgetConfig()) == 10  # its token given back
    done = calling.call(app, handed.envelope, wait_s=5, policies=_policies())
    assert isinstance(done, Done) and done.result["endpoint_id"] == cheap.id
    assert set(_ledger(message.id)) == {keys.call_key(message.id, 0)}


def test_the_hedge_budget_stops_hedges_when_both_endpoints_are_slow(
    simulator: Sim, endpoint: MakeEndpoint
) -> None:
    slow_a, slow_b = simulator(latency_ms=50), simulator(latency_ms=50)
    endpoint(slow_a, "a-slow")
    b = endpoint(slow_b, "b-slow", price_in="0.002")
    policies = _policies(hedge_budget_burst=1)
    # Everything was slow for a while: B's bucket was spent, and one token is left.
    get_redis().hset(keys.hedge_bucket(b.id), "tokens", "0.95")
    before = {o: _hedges_counted(b.id, o) for o in ("fired", "hedge_budget")}
    first = _routed(_message(new_agent("storm"), hedge=Hedge(after_ms=10)), policies)
    fired = calling.call(app, first.hedges[0].envelope, wait_s=5, policies=policies)
    assert isinstance(fired, AnswerFor) and fired.task_id == first.envelope.message_id
    assert slow_b.stats()["calls"] == 1  # its routing deposit made the token whole
    second = _routed(_message(new_agent("storm"), hedge=Hedge(after_ms=10)), policies)
    refused = calling.call(app, second.hedges[0].envelope, wait_s=5, policies=policies)
    assert isinstance(refused, Lost) and "out of hedge budget" in refused.reason
    assert slow_b.stats()["calls"] == 1  # the second hedge was not sent
    assert _reservation(second.hedges[0].envelope.call_key) is None
    done = calling.call(app, second.envelope, wait_s=5, policies=policies)
    assert isinstance(done, Done)  # the first call answers its message as without hedging
    assert {o: _hedges_counted(b.id, o) - n for o, n in before.items()} == {
        "fired": 1, "hedge_budget": 1}  # aimesh_hedges_total


def test_a_routing_task_delivered_again_hands_off_the_same_call_and_its_hedges(
    simulator: Sim, endpoint: MakeEndpoint
) -> None:
    """The router died after keeping the hand-off, before (or while) publishing: the
    delivery that finds the hand-off publishes the same call and the same hedges (same
    call keys, lanes and countdowns), and nothing is reserved or deposited twice."""
    sim = simulator()
    first, second = endpoint(sim, "a-again"), endpoint(sim, "b-again", price_in="0.002")
    message = _message(new_agent("again"), hedge=Hedge(after_ms=250))
    get_redis().hset(keys.hedge_bucket(second.id), "tokens", "0.5")  # below the burst
    handed = _routed(message, _policies())
    tokens = hedge_budget.tokens(second.id, BudgetConfig())
    assert tokens == 0.6  # the first routing's deposit
    again = _routed(message, _policies())
    assert again.envelope == handed.envelope and again.envelope.route[0]["id"] == first.id
    assert [(h.envelope.call_key, h.envelope.lane, h.envelope.route, h.countdown_s)
            for h in again.hedges] == [
        (h.envelope.call_key, h.envelope.lane, h.envelope.route, h.countdown_s)
        for h in handed.hedges] and len(again.hedges) == 1
    assert again.hedges[0].envelope == handed.hedges[0].envelope
    assert hedge_budget.tokens(second.id, BudgetConfig()) == tokens  # no second deposit
    held = _reservation(handed.envelope.call_key)
    assert held is not None and held.state == "reserved"  # the first routing's, kept
    assert _reservation(again.hedges[0].envelope.call_key) is None  # reserved when it fires


def test_a_redelivered_hedge_goes_on_without_spending_a_second_token(
    simulator: Sim, endpoint: MakeEndpoint
) -> None:
    """A hedge whose worker died once it had fired (its token spent, its lane started) is
    delivered again: it goes on with its call, and the bucket is not charged twice."""
    a_sim, b_sim = simulator(latency_ms=50), simulator()
    endpoint(a_sim, "a-died")
    b = endpoint(b_sim, "b-died", price_in="0.002")
    policies, bucket = _policies(hedge_budget_burst=1), BudgetConfig(burst=1)
    get_redis().hset(keys.hedge_bucket(b.id), "tokens", "0.9")
    handed = _routed(_message(new_agent("died"), hedge=Hedge(after_ms=10)), policies)
    [hedge] = handed.hedges
    # The first delivery, up to where its worker died: the token taken, the lane started.
    assert hedge_budget.take(b.id, bucket)
    assert race.start_hedge(handed.envelope.message_id, 1)
    left = hedge_budget.tokens(b.id, bucket)
    assert left < 1  # a second take would be refused
    again = calling.call(app, hedge.envelope, wait_s=5, policies=policies)
    assert isinstance(again, AnswerFor) and again.task_id == handed.envelope.message_id
    assert b_sim.stats()["calls"] == 1
    assert hedge_budget.tokens(b.id, bucket) == left


def test_a_hedge_arriving_after_its_race_was_won_is_not_sent_and_holds_nothing(
    simulator: Sim, endpoint: MakeEndpoint
) -> None:
    a_sim, b_sim = simulator(), simulator()
    a = endpoint(a_sim, "a-quick")
    endpoint(b_sim, "b-late", price_in="0.002")
    message = _message(new_agent("won-first"), hedge=Hedge(after_ms=5000))
    handed = _routed(message, _policies())
    done = calling.call(app, handed.envelope, wait_s=5, policies=_policies())
    assert isinstance(done, Done) and done.result["endpoint_id"] == a.id
    assert race.read(message.id).winner == 0
    late = calling.call(app, handed.hedges[0].envelope, wait_s=5, policies=_policies())
    assert isinstance(late, Lost) and "answered" in late.reason
    assert b_sim.stats()["calls"] == 0
    assert _reservation(handed.hedges[0].envelope.call_key) is None
    assert set(_ledger(message.id)) == {keys.call_key(message.id, 0)}


# --- end to end, through the worker processes -----------------------------------------


@pytest.mark.usefixtures("workers")
def test_a_slow_first_endpoint_is_raced_the_fast_hedge_wins_and_the_loser_is_aborted(
    simulator: Sim, endpoint: MakeEndpoint
) -> None:
    # 15 s: far past the 300 ms hedge however loaded the box, so the order is not a race.
    slow_sim, fast_sim = simulator(latency_ms=15000), simulator(latency_ms=100)
    slow = endpoint(slow_sim, "a-slow", price_in="0.001")
    fast = endpoint(fast_sim, "b-fast", price_in="0.002")
    agent = new_agent("raced")
    pending = submit(agent_id=agent, prompt="race me", max_tokens=16,
                     hedge={"after_ms": 300})
    result = pending.get(timeout=60)
    mid = pending.id
    first_key, hedge_key = keys.call_key(mid, 0), keys.hedge_call_key(mid, 1)
    assert result["endpoint_id"] == fast.id
    assert [(a["endpoint_id"], a["ok"]) for a in result["attempts"]] == [(fast.id, True)]
    # A's request was aborted: its simulator logs the caller gone when its latency ends.
    aborted = wait_until(lambda: _logged(slow_sim, first_key), "the slow call's log entry")
    assert aborted["disconnected"] is True
    hedged = _logged(fast_sim, hedge_key)
    assert hedged is not None and hedged["status"] == 200 and not hedged["disconnected"]
    # Each call that reached a provider is charged once, by the rule.
    ledger = wait_until(lambda: rows if len(rows := _ledger(mid)) == 2 else None,
                        "both calls' ledger rows", seen=lambda: _ledger(mid))
    reserved = _reservation(first_key)
    assert reserved is not None
    assert (ledger[first_key].kind, ledger[first_key].nusd) == ("aborted", reserved.nusd)
    assert ledger[hedge_key].kind == "call" and ledger[hedge_key].nusd > 0
    assert ledger[first_key].endpoint_id == slow.id and ledger[hedge_key].endpoint_id == fast.id
    # One result: what the producer got stays, the loser stored nothing over it.
    assert AsyncResult(mid, app=app).get(timeout=5)["endpoint_id"] == fast.id
    assert AsyncResult(hedge_key, app=app).state == "PENDING"  # the hedge's own id: nothing
    audit = _audit(mid)
    assert audit["hedged"].endpoint_id == fast.id and audit["hedged"].detail["lane"] == 1
    assert audit["completed"].endpoint_id == fast.id
    attempts = wait_until(lambda: rows if len(rows := _attempt_rows(mid)) == 2 else None,
                          "both calls' attempt rows")
    assert {(r.endpoint_id, r.ok) for r in attempts} == {(slow.id, False), (fast.id, True)}


@pytest.mark.usefixtures("workers")
def test_after_ms_zero_races_at_once_and_both_calls_reach_their_providers(
    simulator: Sim, endpoint: MakeEndpoint
) -> None:
    slow_sim, fast_sim = simulator(latency_ms=15000), simulator(latency_ms=50)
    endpoint(slow_sim, "a-race", price_in="0.001")
    fast = endpoint(fast_sim, "b-race", price_in="0.002")
    pending = submit(agent_id=new_agent("race-now", None), prompt="now", max_tokens=16,
                     hedge={"after_ms": 0})
    assert pending.get(timeout=60)["endpoint_id"] == fast.id
    first = wait_until(lambda: _logged(slow_sim, keys.call_key(pending.id, 0)),
                       "the first call's log entry")
    assert first["disconnected"] is True
    assert _audit(pending.id)["hedged"].detail["call_key"] == keys.hedge_call_key(pending.id, 1)


@pytest.mark.usefixtures("workers")
def test_a_failed_hedge_leaves_the_race_to_the_first_call_and_both_failing_is_one_error(
    simulator: Sim, endpoint: MakeEndpoint
) -> None:
    # A answers after 8 s: the hedge (published with the hand-off) has started by then
    # however loaded the box, so it is fired and fails, rather than not being sent.
    a_sim, broken_sim = simulator(latency_ms=8000), simulator(error_rate=1.0)
    a = endpoint(a_sim, "a-steady", price_in="0.001")
    endpoint(broken_sim, "b-broken", price_in="0.002")
    agent = new_agent("hedge-fails")
    steady = submit(agent_id=agent, prompt="steady", max_tokens=16, hedge={"after_ms": 0})
    assert steady.get(timeout=60)["endpoint_id"] == a.id
    hedge_call = _logged(broken_sim, keys.hedge_call_key(steady.id, 1))
    assert hedge_call is not None and hedge_call["status"] == 500

    a_sim.configure(error_rate=1.0)
    both = submit(agent_id=agent, prompt="both fail", max_tokens=16, hedge={"after_ms": 0})
    with pytest.raises(AllEndpointsFailed) as caught:
        both.get(timeout=60)
    tried = [att["endpoint_id"] for att in caught.value.fields["attempts"]]
    assert tried[0] == a.id and len(tried) == 2  # the first call's path: A, then B
    keys_seen = {c["call_key"] for c in broken_sim.calls()}
    assert keys.hedge_call_key(both.id, 1) in keys_seen  # the hedge was made, and failed
    assert _audit(both.id)["failed"].reason is not None
