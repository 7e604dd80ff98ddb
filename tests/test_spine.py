"""The message path end to end: submit → aimesh.route → endpoint queue → provider → result.

Real Redis broker and result backend, real Postgres, real worker subprocesses (a threads
router worker and a prefork endpoint worker), real HTTP to the simulated provider.
"""

from __future__ import annotations

import base64
import json
import math
import os
import signal
import subprocess
import sys
import uuid
from collections.abc import Callable
from decimal import Decimal
from typing import Any

import pytest
import redis
from sqlalchemy import select

from aimesh_tasks import outbox, submit
from aimesh_tasks.app import app
from aimesh_tasks.db import CallAttemptRow, session_scope
from aimesh_tasks.delivery import dead_letters
from aimesh_tasks.errors import InvalidMessage, NoEndpointAvailable
from aimesh_tasks.keys import ROUTE_QUEUE
from aimesh_tasks.observability.exporter import priority_lists, queue_depths
from aimesh_tasks.registry import Endpoint, set_enabled
from aimesh_tasks.registry.live import call_finished, call_started
from aimesh_tasks.routing import decisions_for
from aimesh_tasks.simulator import RunningSimulator
from aimesh_tasks.tasks import route_message
from tests.conftest import BROKER_DB, REDIS
from tests.gate import Gate
from tests.waits import wait_until

pytestmark = pytest.mark.usefixtures("workers")

Sim = Callable[..., RunningSimulator]
MakeEndpoint = Callable[..., Endpoint]
MakeGate = Callable[[RunningSimulator], Gate]


def _ask(agent: str = "spine-test", **fields: Any) -> dict[str, Any]:
    fields.setdefault("prompt", "Say hello to the spine")
    result: dict[str, Any] = submit(agent_id=agent, max_tokens=64, **fields).get(timeout=30)
    return result


@pytest.mark.broker
def test_submit_resolves_to_the_result_of_the_cheapest_endpoint(
    simulator: Sim, endpoint: MakeEndpoint
) -> None:
    sim = simulator(completion_tokens=12)
    # ids chosen so that the id tie-break would pick the dear one: the score must decide
    cheap = endpoint(sim, "z-cheap", price_in="0.001", price_out="0.002")
    dear = endpoint(sim, "a-dear", price_in="0.010", price_out="0.020")
    result = _ask()
    assert result["endpoint_id"] == cheap.id
    assert result["output_tokens"] == 12 and result["input_tokens"] > 0
    expected_cost = Decimal(result["input_tokens"]) * Decimal("0.001") / 1000 + Decimal(
        12) * Decimal("0.002") / 1000
    assert Decimal(result["cost_usd"]) == expected_cost
    assert result["text"] and result["cached"] is False
    assert result["queue_wait_ms"] >= 0 and result["processing_ms"] > 0
    assert sim.stats()["calls"] == 1
    [decision] = decisions_for(result["message_id"])
    assert decision["winner"] == cheap.id and decision["fallbacks"] == [dear.id]
    by_id = {c["endpoint_id"]: c for c in decision["candidates"]}
    assert by_id[cheap.id]["score"] < by_id[dear.id]["score"]


def test_recorded_breakdown_matches_the_weights(simulator: Sim, endpoint: MakeEndpoint) -> None:
    sim = simulator()
    endpoint(sim, "a", price_in="0.001", price_out="0.001")
    endpoint(sim, "b", price_in="0.003", price_out="0.003")
    endpoint(sim, "c", price_in="0.002", price_out="0.002")
    result = _ask()
    [decision] = decisions_for(result["message_id"])
    assert decision["weights"] == {"cost": 0.4, "load": 0.3, "latency": 0.3}
    for c in decision["candidates"]:
        expected = 0.4 * c["cost_norm"] + 0.3 * c["load_norm"] + 0.3 * c["latency_norm"]
        assert math.isclose(c["score"], expected, abs_tol=1e-6)
    scores = [c["score"] for c in decision["candidates"]]
    assert scores == sorted(scores)
    assert [c["cost_norm"] for c in decision["candidates"]] == [0.0, 0.5, 1.0]


def test_loaded_endpoint_loses_to_an_idle_one_at_equal_price(
    simulator: Sim, endpoint: MakeEndpoint
) -> None:
    sim = simulator()
    busy = endpoint(sim, "busy", capacity=10)
    idle = endpoint(sim, "idle", capacity=10)
    for n in range(5):
        call_started(busy.id, f"elsewhere-{n}")
    assert _ask()["endpoint_id"] == idle.id


def test_slow_endpoint_loses_to_a_fast_one_at_equal_price(
    simulator: Sim, endpoint: MakeEndpoint
) -> None:
    sim = simulator()
    # ids chosen so that the id tie-break would pick the slow one: the score must decide
    slow = endpoint(sim, "a-slow")
    fast = endpoint(sim, "z-fast")
    for n in range(5):
        call_finished(slow.id, f"s{n}", 900.0, ok=True)
        call_finished(fast.id, f"f{n}", 20.0, ok=True)
    result = _ask()
    assert result["endpoint_id"] == fast.id
    [decision] = decisions_for(result["message_id"])
    by_id = {c["endpoint_id"]: c for c in decision["candidates"]}
    assert by_id[slow.id]["latency_norm"] == 1.0 and by_id[fast.id]["latency_norm"] == 0.0
    assert by_id[fast.id]["score"] < by_id[slow.id]["score"]


def test_disabled_unhealthy_and_full_endpoints_are_never_chosen(
    simulator: Sim, endpoint: MakeEndpoint
) -> None:
    sim = simulator()
    disabled = endpoint(sim, "disabled", price_in="0.0001", price_out="0.0001")
    down = endpoint(sim, "down", price_in="0.0002", price_out="0.0002")
    full = endpoint(sim, "full", price_in="0.0003", price_out="0.0003", capacity=1)
    last = endpoint(sim, "last-resort", price_in="0.5", price_out="0.5")
    set_enabled(disabled.id, False)
    for n in range(5):
        call_finished(down.id, f"d{n}", 5.0, ok=False)
    call_started(full.id, "holding-the-only-slot")
    results = [_ask() for _ in range(3)]
    assert {r["endpoint_id"] for r in results} == {last.id}
    [decision, *_] = decisions_for(results[0]["message_id"])
    assert decision["excluded"][disabled.id] == "disabled"
    assert decision["excluded"][down.id].startswith("unhealthy")
    assert decision["excluded"][full.id] == "at capacity: 1/1 in flight"


def test_no_candidate_is_a_clear_recorded_error(simulator: Sim, endpoint: MakeEndpoint) -> None:
    sim = simulator()
    only = endpoint(sim, "only", model="model-a")
    async_result = submit(agent_id="spine-test", prompt="hi", model="model-b")
    with pytest.raises(NoEndpointAvailable) as caught:
        async_result.get(timeout=30)
    assert only.id in caught.value.excluded
    assert "model-b" in str(caught.value)
    [decision] = decisions_for(async_result.id)
    assert decision["winner"] is None and "model-b" in decision["error"]
    assert sim.stats()["calls"] == 0


@pytest.mark.broker
def test_failing_endpoint_falls_back_to_the_next_and_both_are_recorded(
    simulator: Sim, endpoint: MakeEndpoint
) -> None:
    broken_sim = simulator(error_rate=1.0)
    good_sim = simulator()
    broken = endpoint(broken_sim, "broken", price_in="0.001", price_out="0.001")
    good = endpoint(good_sim, "good", price_in="0.002", price_out="0.002")
    result = _ask()
    assert result["endpoint_id"] == good.id
    assert [(a["endpoint_id"], a["ok"]) for a in result["attempts"]] == [
        (broken.id, False), (good.id, True)]
    assert result["attempts"][0]["error"]["status"] == 500
    assert broken_sim.stats()["errors_500"] == 1 and good_sim.stats()["ok"] == 1
    outbox.flush(wait_s=10)
    with session_scope() as session:
        rows = session.scalars(
            select(CallAttemptRow).where(CallAttemptRow.message_id == result["message_id"])
            .order_by(CallAttemptRow.id)
        ).all()
        assert [(r.endpoint_id, r.ok, r.status) for r in rows] == [
            (broken.id, False, 500), (good.id, True, None)]


def test_bad_messages_are_refused_before_anything_is_queued() -> None:
    broker = redis.Redis.from_url(f"{REDIS}/{BROKER_DB}")
    queue = "aimesh.test.unconsumed"
    broker.delete(*priority_lists(queue))
    bad = {"agent_id": "Bad Agent", "prompt": "hi"}
    with pytest.raises(InvalidMessage, match="agent_id"):
        submit(bad)
    with pytest.raises(InvalidMessage, match="agent_id"):
        route_message.apply_async((bad,), queue=queue)
    with pytest.raises(InvalidMessage, match="max_tokens"):
        route_message.delay({"agent_id": "a", "prompt": "hi", "max_tokens": -1})
    assert queue_depths(broker, [queue])[queue] == 0  # every priority list of the queue
    route_message.apply_async(({"agent_id": "a", "prompt": "hi"},), queue=queue)
    assert queue_depths(broker, [queue])[queue] == 1  # the same path does queue a good one
    broker.delete(*priority_lists(queue))


# A broker that is away: submit's error names the broker (password masked), why, and the
# message; the accepted-message record written before the publish is taken back.
_AWAY = """
import json, sys
from aimesh_tasks import ServiceUnavailable, submit
try:
    submit(id=sys.argv[1], agent_id="away-bot", prompt="hi", max_tokens=5)
except ServiceUnavailable as exc:
    print(json.dumps(exc.to_dict()))
"""


@pytest.mark.slow
def test_a_broker_that_cannot_take_the_message_is_a_clear_error_and_nothing_stays() -> None:
    from aimesh_tasks.db.models import AcceptedMessageRow

    message_id = f"away-{uuid.uuid4().hex}"
    broker = "redis://:hunter2@127.0.0.1:1/0"  # port 1: nothing listens
    done = subprocess.run([sys.executable, "-c", _AWAY, message_id], capture_output=True,
                          text=True, timeout=120, env={
                              **os.environ, "AIMESH_BROKER_URL": broker,
                              "AIMESH_ACCEPTED_LOG": "true"})
    assert done.returncode == 0 and done.stdout, done.stderr[-2000:]
    error = json.loads(done.stdout)
    assert error["code"] == "service_unavailable" and error["service"] == "broker"
    assert error["message_id"] == message_id and error["reason"]
    assert "127.0.0.1:1" in error["message"] and "nothing was queued" in error["message"]
    assert "hunter2" not in done.stdout + done.stderr
    with session_scope() as session:
        assert session.get(AcceptedMessageRow, message_id) is None


def test_pickle_message_is_refused_and_the_queue_keeps_flowing(
    simulator: Sim, endpoint: MakeEndpoint, tmp_path: Any
) -> None:
    sim = simulator()
    endpoint(sim, "after-pickle")
    marker = tmp_path / "pickle-was-executed"
    task_id = f"pickled-{uuid.uuid4().hex}"

    class Exploit:
        def __reduce__(self) -> tuple[Any, ...]:
            return (os.system, (f"touch {marker}",))

    with app.producer_or_acquire() as producer:
        producer.publish(
            [[Exploit()], {}, {}],
            serializer="pickle",
            routing_key="aimesh.route",
            exchange="aimesh.route",
            headers={"task": "aimesh.route", "id": task_id, "lang": "py"},
        )

    def refused() -> dead_letters.DeadLetter | None:  # the router set this very message aside
        return next((e for e in dead_letters.list_entries(ROUTE_QUEUE)
                     if e["task_id"] == task_id), None)

    entry = wait_until(refused, f"the router to dead-letter the pickled message {task_id}",
                       seen=lambda: dead_letters.list_entries(ROUTE_QUEUE))
    assert entry["reason"] == "content_type" and "pickle" in entry["detail"]
    body = base64.b64decode(json.loads(entry["raw"])["body"])  # the envelope, as queued
    assert str(marker).encode() in body  # the pickle kept as bytes, never loaded
    broker = redis.Redis.from_url(f"{REDIS}/{BROKER_DB}")

    def parked() -> list[bytes]:  # still on the queue, or taken and not yet acked
        held = [*(m for name in priority_lists(ROUTE_QUEUE) for m in broker.lrange(name, 0, -1)),
                *broker.hvals("unacked")]
        return [m for m in held if task_id.encode() in m]

    # The dead letter is written before the message is acked: wait for the ack.
    wait_until(lambda: not parked(), "the pickled message to leave the queue for good",
               seen=parked)
    assert _ask()["text"]
    assert not marker.exists()


@pytest.mark.broker
def test_sigkill_of_the_process_running_a_call_still_completes_once(
    simulator: Sim, endpoint: MakeEndpoint, gate: MakeGate
) -> None:
    sim = simulator()
    held = gate(sim)
    only = endpoint(held, "slow-kill")
    async_result = submit(agent_id="spine-test", prompt="survive a kill", max_tokens=16)
    [caller] = held.wait_held()  # the provider answered; the calling process waits for it
    os.kill(held.caller_pid(caller), signal.SIGKILL)
    held.open()
    result = async_result.get(timeout=60)
    assert result["endpoint_id"] == only.id
    assert sim.stats()["calls"] == 2  # the killed call, then the redelivered one
    outbox.flush(wait_s=10)
    with session_scope() as session:
        ok_rows = session.scalars(
            select(CallAttemptRow).where(CallAttemptRow.message_id == async_result.id,
                                         CallAttemptRow.ok.is_(True))).all()
        assert len(ok_rows) == 1
