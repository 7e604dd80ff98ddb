"""The message path as plain functions: every routing and call outcome, without a worker.

`pipeline.routing.route` and `pipeline.calling.call` run here in the test process, on real
Redis, Postgres and the simulator; nothing is consumed from a queue (an outcome that hands
off only says so), so each outcome is checked on its own.
"""

from __future__ import annotations

import json
import os
import socket
from collections.abc import Callable, Iterator
from datetime import timedelta
from decimal import Decimal
from typing import Any

import pytest
from sqlalchemy import select

from aimesh_tasks import keys, outbox
from aimesh_tasks.app import app
from aimesh_tasks.budgets import set_budget as _set_budget
from aimesh_tasks.db import AuditRow, LedgerRow, ReservationRow, session_scope
from aimesh_tasks.db.engine import DbPoolExhausted
from aimesh_tasks.envelope import Envelope
from aimesh_tasks.errors import DeadlineExceeded, NoEndpointAvailable, ProviderError, Refused
from aimesh_tasks.governance import add_agent
from aimesh_tasks.messages import AiMessage, utcnow
from aimesh_tasks.pipeline import call as pipeline_call
from aimesh_tasks.pipeline import calling, routing
from aimesh_tasks.pipeline.outcomes import Done, Failed, Fallback, HandOff, Hit, Joined, Retry
from aimesh_tasks.pipeline.outcomes import Refused as RefusedOutcome
from aimesh_tasks.policies import Policies, Policy, RouteContext
from aimesh_tasks.policies.budget import BudgetAdmission
from aimesh_tasks.redis_batch import Batch, Reader
from aimesh_tasks.redis_client import get_redis
from aimesh_tasks.registry import Endpoint
from tests.redis_trips import round_trips

pytestmark = pytest.mark.usefixtures("clean")


class RefuseEveryone(Policy):
    """A policy that refuses in before_route."""

    name = "refuse-everyone"

    def before_route(self, ctx: RouteContext) -> None:
        raise Refused("closed for the test", policy=self.name)


class ReadsAKey(Policy):
    """A policy that reads one Redis key on routing's batch."""

    name = "reads-a-key"

    def queue_route_reads(self, batch: Batch, message: AiMessage) -> Reader[Any]:
        index = batch.call("GET", "aimesh:test:policy-read")
        return lambda: batch[index]

    def before_route(self, ctx: RouteContext) -> None:
        assert ctx.reads[self.name] == "seen"


def set_budget(agent_id: str, usd: str) -> None:
    add_agent(agent_id)
    _set_budget(agent_id, usd=usd)


def _message(agent: str = "path-agent", **fields: Any) -> AiMessage:
    return AiMessage(agent_id=agent, prompt=fields.pop("prompt", "what is a queue?"),
                     max_tokens=16, **fields)


def _route(message: AiMessage, policies: Policies | None = None) -> Any:
    return routing.route(app, message, policies=policies or Policies([BudgetAdmission()]))


def _call(envelope: Envelope, wait_s: float = 5.0) -> Any:
    return calling.call(app, envelope, wait_s=wait_s, policies=Policies([BudgetAdmission()]))


def _reservations(message_id: str) -> list[ReservationRow]:
    with session_scope() as session:
        return list(session.scalars(select(ReservationRow)
                                    .where(ReservationRow.message_id == message_id)))


def _ledger(message_id: str) -> list[LedgerRow]:
    with session_scope() as session:
        return list(session.scalars(select(LedgerRow).where(LedgerRow.message_id == message_id)))


def _audit(message_id: str) -> list[tuple[str, str | None, dict[str, Any]]]:
    outbox.flush(wait_s=5)
    with session_scope() as session:
        rows = session.scalars(select(AuditRow).where(AuditRow.message_id == message_id)
                               .order_by(AuditRow.id))
        return [(r.event, r.reason, r.detail) for r in rows]


@pytest.fixture()
def one(simulator: Callable[..., Any], endpoint: Callable[..., Endpoint]) -> Endpoint:
    return endpoint(simulator(), "path-one")


def test_route_hands_off_once_for_two_deliveries_of_one_message(one: Endpoint) -> None:
    set_budget("path-agent", usd="1")
    message = _message()
    first, second = _route(message), _route(message)
    assert isinstance(first, HandOff) and isinstance(second, HandOff)
    assert first.envelope == second.envelope
    assert first.envelope.route[0]["id"] == one.id and first.envelope.metered
    assert [r.call_key for r in _reservations(message.id)] == [keys.call_key(message.id, 0)]
    assert [event for event, _, _ in _audit(message.id)] == ["routed"]
    # The kept hand-off carries no prompt text: a duplicate brings its own message.
    kept = get_redis().get(keys.handoff(message.id))
    assert kept is not None and "what is a queue" not in kept


def test_identical_message_joins_and_a_cached_answer_is_a_hit(one: Endpoint) -> None:
    leader, follower = _message(), _message()
    assert isinstance(_route(leader), HandOff)
    assert isinstance(_route(follower), Joined)
    done = _call(_route(leader).envelope)
    assert isinstance(done, Done)
    hit = _route(_message())
    assert isinstance(hit, Hit) and hit.result["cached"] and hit.result["text"] == done.result[
        "text"]


def test_a_policy_refusal_stops_the_message_before_budget_and_dispatch(one: Endpoint) -> None:
    set_budget("path-agent", usd="1")
    message = _message()
    outcome = _route(message, Policies([RefuseEveryone(), BudgetAdmission()]))
    assert isinstance(outcome, RefusedOutcome)
    assert isinstance(outcome.error, Refused) and outcome.error.policy == "refuse-everyone"
    assert _reservations(message.id) == []
    assert get_redis().get(keys.handoff(message.id)) is None
    events = _audit(message.id)
    assert [(e, r) for e, r, _ in events] == [("denied", "closed for the test")]
    assert events[0][2]["policy"] == "refuse-everyone"


def test_a_policys_redis_reads_ride_routings_batch(one: Endpoint,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    get_redis().set("aimesh:test:policy-read", "seen")
    _route(_message(prompt="warm up the registry cache"))
    sent = round_trips(monkeypatch)
    assert isinstance(_route(_message(prompt="baseline")), HandOff)
    baseline = len(sent)
    sent.clear()
    with_policy = Policies([BudgetAdmission(), ReadsAKey()])
    assert isinstance(_route(_message(prompt="with a policy"), with_policy), HandOff)
    assert len(sent) == baseline


def test_expired_message_is_refused_with_deadline_exceeded(one: Endpoint) -> None:
    data = _message().to_json_dict()
    data["deadline"] = (utcnow() - timedelta(seconds=1)).isoformat()
    late = AiMessage.decode(data)  # accepted earlier; its deadline passed in the queue
    outcome = _route(late)
    assert isinstance(outcome, RefusedOutcome) and isinstance(outcome.error, DeadlineExceeded)
    assert "routing queue" in outcome.error.message


def test_no_candidate_is_refused(one: Endpoint) -> None:
    outcome = _route(_message(model="no-such-model"))
    assert isinstance(outcome, RefusedOutcome)
    assert isinstance(outcome.error, NoEndpointAvailable)


def test_call_done_once_and_a_second_delivery_finds_the_journal(
    one: Endpoint, simulator: Callable[..., Any]
) -> None:
    set_budget("path-agent", usd="1")
    message = _message()
    envelope = _route(message).envelope
    first, second = _call(envelope), _call(envelope)
    assert isinstance(first, Done) and isinstance(second, Done)
    assert second.result["text"] == first.result["text"]
    assert second.result["input_tokens"] == first.result["input_tokens"]
    ledger = _ledger(message.id)
    assert len(ledger) == 1 and ledger[0].kind == "call"
    assert Decimal(first.result["charged_usd"]) == Decimal(first.result["cost_usd"]) > 0
    assert [e for e, _, _ in _audit(message.id)] == ["routed", "completed"]


def test_a_lease_held_by_a_live_delivery_elsewhere_asks_for_a_retry(one: Endpoint) -> None:
    envelope = _route(_message()).envelope
    call_key = keys.call_key(envelope.message_id, 0)
    get_redis().set(keys.call_lease(call_key), "7|another-host|1", px=60_000)
    outcome = _call(envelope, wait_s=0.2)
    assert isinstance(outcome, Retry)


def test_an_outage_before_the_call_gives_the_lease_back_for_the_retry(
    one: Endpoint, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A pool with every connection busy when the call's reservation is claimed: nothing
    was called, so the task's retry takes the lease at once instead of waiting for this
    live process's lease to expire."""
    set_budget("path-agent", usd="1")
    message = _message()
    envelope = _route(message).envelope

    def busy(charged_key: str) -> str:
        raise DbPoolExhausted(1, 0.2)

    monkeypatch.setattr(pipeline_call, "claim", busy)
    with pytest.raises(DbPoolExhausted):
        _call(envelope)
    assert get_redis().get(keys.call_lease(keys.call_key(message.id, 0))) is None
    monkeypatch.undo()
    assert isinstance(_call(envelope, wait_s=0.2), Done)  # a held lease would be Retry
    assert [r.kind for r in _ledger(message.id)] == ["call"]


def test_a_lease_held_by_a_dead_process_here_is_taken_over(
    one: Endpoint, simulator: Callable[..., Any]
) -> None:
    dead = os.fork()
    if dead == 0:
        os._exit(0)
    os.waitpid(dead, 0)
    envelope = _route(_message()).envelope
    call_key = keys.call_key(envelope.message_id, 0)
    get_redis().set(keys.call_lease(call_key), f"7|{socket.gethostname()}|{dead}", px=60_000)
    assert isinstance(_call(envelope, wait_s=30), Done)


def test_failure_falls_back_with_the_next_call_reserved(
    simulator: Callable[..., Any], endpoint: Callable[..., Endpoint]
) -> None:
    set_budget("path-agent", usd="1")
    broken = endpoint(simulator(error_rate=1.0), "path-broken", price_in="0.0001",
                      price_out="0.0001")
    good = endpoint(simulator(), "path-good")
    message = _message()
    envelope = _route(message).envelope
    assert envelope.route[0]["id"] == broken.id
    outcome = _call(envelope)
    assert isinstance(outcome, Fallback)
    assert outcome.envelope.route[0]["id"] == good.id
    assert outcome.envelope.attempt_no == 1
    assert {r.call_key for r in _reservations(message.id)} == {
        keys.call_key(message.id, 0), keys.call_key(message.id, 1)}
    # A second delivery of the failed call repeats its decision, calling nothing again.
    again = _call(envelope)
    assert isinstance(again, Fallback) and again.envelope.route == outcome.envelope.route
    assert isinstance(_call(outcome.envelope), Done)


def test_the_last_endpoint_failing_fails_the_message(
    simulator: Callable[..., Any], endpoint: Callable[..., Endpoint]
) -> None:
    endpoint(simulator(error_rate=1.0), "path-only-broken")
    outcome = _call(_route(_message()).envelope)
    assert isinstance(outcome, Failed) and isinstance(outcome.error, ProviderError)
    assert outcome.error.status == 500 and outcome.error.action == "fallback"


def test_a_deadline_passed_before_the_call_releases_the_reservation(one: Endpoint) -> None:
    set_budget("path-agent", usd="1")
    message = _message(deadline=utcnow() + timedelta(hours=1))
    envelope = _route(message).envelope
    late = dict(envelope.message, deadline=(utcnow() - timedelta(seconds=1)).isoformat())
    outcome = _call(Envelope.from_json({**envelope.to_json(), "message": late}))
    assert isinstance(outcome, Failed) and isinstance(outcome.error, DeadlineExceeded)
    assert [r.state for r in _reservations(message.id)] == ["released"]


def test_missing_usage_is_charged_at_the_reservation_and_flagged(
    simulator: Callable[..., Any], endpoint: Callable[..., Endpoint]
) -> None:
    set_budget("path-agent", usd="1")
    endpoint(simulator(no_usage_rate=1.0), "path-no-usage")
    message = _message()
    envelope = _route(message).envelope
    held = _reservations(message.id)[0]
    outcome = _call(envelope)
    assert isinstance(outcome, Done) and outcome.result["usage_estimated"]
    ledger = _ledger(message.id)
    assert [(row.kind, row.tokens, row.nusd) for row in ledger] == [
        ("estimated", held.tokens, held.nusd)]
    assert held.nusd > 0


def test_envelope_round_trip_and_version_refusal() -> None:
    envelope = Envelope(message={"id": "m", "agent_id": "a", "messages": []},
                        route=[{"id": "e"}], metered=True)  # type: ignore[list-item]
    assert Envelope.from_json(json.loads(json.dumps(envelope.to_json()))) == envelope
    with pytest.raises(Exception, match="version 99"):
        Envelope.from_json({**envelope.to_json(), "v": 99})


@pytest.fixture(autouse=True)
def _no_leftover_test_keys() -> Iterator[None]:
    yield
    get_redis().delete("aimesh:test:policy-read")
