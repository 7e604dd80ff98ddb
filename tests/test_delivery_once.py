"""Nothing charged twice, through real workers: duplicate publishes, byte-identical copies
of a task message on the route queue and on an endpoint queue, and a follower whose
deadline passes while it waits. The simulator's call log is the truth about upstream
calls; the ledger and reservations the truth about charges."""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta
from typing import Any

import pytest
import redis
from celery.result import AsyncResult
from sqlalchemy import select

from aimesh_tasks import route_message
from aimesh_tasks.app import app
from aimesh_tasks.budgets import set_budget
from aimesh_tasks.db import LedgerRow, ReservationRow, session_scope
from aimesh_tasks.errors import DeadlineExceeded
from aimesh_tasks.governance import add_agent
from aimesh_tasks.messages import AiMessage, utcnow
from aimesh_tasks.observability.exporter import priority_lists, queue_depths
from aimesh_tasks.pipeline import routing
from aimesh_tasks.pipeline.outcomes import HandOff
from aimesh_tasks.producer import submit
from aimesh_tasks.redis_client import get_redis
from aimesh_tasks.registry import Endpoint
from aimesh_tasks.tasks.call import call_signature
from tests.conftest import BROKER_DB, REDIS
from tests.waits import wait_until

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("workers")]
HOLDING = "aimesh.test.holding"  # no worker consumes it


def _metered(agent: str) -> str:
    add_agent(agent)
    set_budget(agent, usd="5")
    return agent


def _calls_of(sim: Any, message_id: str) -> list[dict[str, Any]]:
    return [c for c in sim.calls() if str(c["call_key"] or "").startswith(f"{message_id}:")]


def _charges(message_id: str) -> tuple[list[str], list[str]]:
    with session_scope() as session:
        ledger = session.scalars(select(LedgerRow.kind).where(LedgerRow.message_id == message_id))
        held = session.scalars(select(ReservationRow.state)
                               .where(ReservationRow.message_id == message_id))
        return list(ledger), list(held)


def _broker() -> redis.Redis:
    return redis.Redis.from_url(f"{REDIS}/{BROKER_DB}")


def _depth(queue: str) -> int:
    """Messages waiting in a queue, every priority list of it (kombu keeps one per step)."""
    return queue_depths(_broker(), [queue])[queue]


def _twice_on(queue: str, publish: Callable[[], Any]) -> None:
    """Publish one task message to a queue nobody consumes, then put two byte-identical
    copies of it on `queue` in one command (what a visibility-timeout redelivery makes),
    in the list of the message's priority."""
    broker = _broker()
    broker.delete(*priority_lists(HOLDING))
    publish()
    found = [(step, raw) for step, name in enumerate(priority_lists(HOLDING))
             if (raw := broker.rpop(name)) is not None]
    assert found, "the task message did not reach the holding queue"
    [(step, raw)] = found
    broker.lpush(priority_lists(queue)[step], raw, raw)


@pytest.mark.parametrize("no_cache", [False, True])
def test_one_message_published_twice_is_one_call_and_one_charge(
    simulator: Callable[..., Any], endpoint: Callable[..., Endpoint], no_cache: bool
) -> None:
    sim = simulator(latency_ms=200)
    endpoint(sim, "twice")
    agent = _metered("twice-agent")
    message = AiMessage(agent_id=agent, prompt="published twice", max_tokens=8,
                        no_cache=no_cache)
    first = route_message.apply_async((message.to_json_dict(),))
    second = route_message.apply_async((message.to_json_dict(),))  # a producer's retry
    answer = first.get(timeout=60)
    assert second.get(timeout=60)["text"] == answer["text"]
    wait_until(lambda: _charges(message.id)[1] == ["settled"], "the reservation settled",
               seen=lambda: _charges(message.id))
    assert len(_calls_of(sim, message.id)) == 1
    assert _charges(message.id) == (["call"], ["settled"])


def test_identical_copies_on_the_route_queue_are_one_call(
    simulator: Callable[..., Any], endpoint: Callable[..., Endpoint]
) -> None:
    sim = simulator(latency_ms=100)
    endpoint(sim, "copies-route")
    agent = _metered("copies-route-agent")
    message = AiMessage(agent_id=agent, prompt="copied on the route queue", max_tokens=8)
    _twice_on("aimesh.route", lambda: route_message.apply_async(
        (message.to_json_dict(),), queue=HOLDING))
    AsyncResult(message.id, app=app).get(timeout=60)
    wait_until(lambda: _charges(message.id)[1] == ["settled"], "the reservation settled",
               seen=lambda: _charges(message.id))
    # Let the second copy finish too (it finds the hand-off, then the journal).
    wait_until(lambda: _depth("aimesh.route") == 0, "the route queue drained")
    assert len(_calls_of(sim, message.id)) == 1
    assert _charges(message.id) == (["call"], ["settled"])


def test_identical_copies_on_an_endpoint_queue_are_one_call(
    simulator: Callable[..., Any], endpoint: Callable[..., Endpoint]
) -> None:
    sim = simulator(latency_ms=300)
    target = endpoint(sim, "copies-endpoint")
    agent = _metered("copies-endpoint-agent")
    message = AiMessage(agent_id=agent, prompt="copied on the endpoint queue", max_tokens=8)
    routed = routing.route(app, message)  # route here, then copy the call task
    assert isinstance(routed, HandOff)
    _twice_on(target.queue, lambda: call_signature(routed.envelope).apply_async(
        task_id=message.id, queue=HOLDING))
    answer = AsyncResult(message.id, app=app).get(timeout=60)
    assert answer["endpoint_id"] == target.id
    wait_until(lambda: _depth(target.queue) == 0, "the endpoint queue drained")
    wait_until(lambda: _charges(message.id)[1] == ["settled"], "the reservation settled",
               seen=lambda: _charges(message.id))
    assert len(_calls_of(sim, message.id)) == 1
    assert _charges(message.id) == (["call"], ["settled"])


def test_a_follower_whose_deadline_passes_gets_deadline_exceeded_and_the_rest_answers(
    simulator: Callable[..., Any], gate: Callable[..., Any], endpoint: Callable[..., Endpoint]
) -> None:
    sim = simulator()
    held = gate(sim)
    endpoint(held, "deadline-follow")
    prompt = {"agent_id": "deadline-agent", "prompt": "a slow question", "max_tokens": 8}
    leader = submit(**prompt)
    held.wait_held(1)  # the leader's call has reached the provider; its answer waits
    deadline = utcnow() + timedelta(seconds=5)
    late = submit(**prompt, deadline=deadline)
    patient = submit(**prompt)
    wait_until(lambda: _joins() >= 2, "both followers joined the flight", seen=_joins)
    wait_until(lambda: utcnow() > deadline, "the late follower's deadline passed")
    held.open()
    answer = leader.get(timeout=60)
    assert patient.get(timeout=60)["text"] == answer["text"]
    with pytest.raises(DeadlineExceeded) as caught:
        late.get(timeout=60)
    assert "waited for an identical message" in caught.value.message
    assert len(sim.calls()) == 1


def _joins() -> int:
    return int(get_redis().hget("aimesh:dedup:counters", "joins") or 0)


def test_a_message_that_expires_in_the_queue_fails_with_deadline_exceeded(
    simulator: Callable[..., Any], endpoint: Callable[..., Endpoint]
) -> None:
    endpoint(simulator(), "expires-queued")
    message = AiMessage(agent_id="expiry-agent", prompt="too late", max_tokens=8,
                        deadline=utcnow() + timedelta(hours=1))
    data = message.to_json_dict()
    data["deadline"] = (utcnow() - timedelta(seconds=1)).isoformat()  # passed while queued
    app.send_task("aimesh.route", args=(data,), task_id=message.id, queue="aimesh.route")
    with pytest.raises(DeadlineExceeded) as caught:
        AsyncResult(message.id, app=app).get(timeout=60)
    assert "routing queue" in caught.value.message
