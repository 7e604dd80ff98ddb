"""Dedup end to end: exact cache, single-flight across worker processes, per-message controls.

Real Redis, real worker subprocesses; the simulator's call counter is the truth about
upstream calls.
"""

from __future__ import annotations

import os
import signal
import uuid
from collections.abc import Callable
from decimal import Decimal

import pytest
from sqlalchemy import select

from aimesh_tasks import keys, submit
from aimesh_tasks.app import app
from aimesh_tasks.budgets import set_budget
from aimesh_tasks.db import LedgerRow, session_scope
from aimesh_tasks.dedup import cache
from aimesh_tasks.dedup.request_key import cache_scope, request_key
from aimesh_tasks.governance.agents import add_agent
from aimesh_tasks.messages import parse_message
from aimesh_tasks.redis_client import get_redis
from aimesh_tasks.registry import Endpoint
from aimesh_tasks.simulator import RunningSimulator
from tests.budget_checks import assert_budget_invariants
from tests.gate import Gate
from tests.waits import wait_until

pytestmark = pytest.mark.usefixtures("workers")

Sim = Callable[..., RunningSimulator]
MakeEndpoint = Callable[..., Endpoint]
MakeGate = Callable[[RunningSimulator], Gate]


@pytest.mark.broker
def test_100_identical_messages_make_one_upstream_call(simulator: Sim, endpoint: MakeEndpoint
                                                       ) -> None:
    sim = simulator(latency_ms=300)
    endpoint(sim, "single-flight")
    before = cache.counters()
    pending = [submit(agent_id="sf-agent", prompt="Name three prime numbers", max_tokens=20)
               for _ in range(100)]
    results = [p.get(timeout=60) for p in pending]
    assert sim.stats()["calls"] == 1
    assert len({r["text"] for r in results}) == 1
    assert len({r["message_id"] for r in results}) == 100
    leaders = [r for r in results if not r["cached"] and not r["dedup"]]
    assert len(leaders) == 1 and Decimal(leaders[0]["cost_usd"]) > 0
    for r in results:
        if r is not leaders[0]:
            assert Decimal(r["cost_usd"]) == 0
            assert Decimal(r["cost_saved_usd"]) == Decimal(leaders[0]["cost_usd"])
    after = cache.counters()
    joined_or_hit = (after["joins"] - before["joins"]) + (after["hits"] - before["hits"])
    assert joined_or_hit == 99


def test_cache_is_scoped_per_agent_and_kept_for_the_message_ttl(
    simulator: Sim, endpoint: MakeEndpoint
) -> None:
    sim = simulator()
    endpoint(sim, "scoped")
    ask = dict(prompt="Define entropy", max_tokens=20, cache_ttl_s=60)
    first = submit(agent_id="agent-one", **ask).get(timeout=30)
    hit = submit(agent_id="agent-one", **ask).get(timeout=30)
    other = submit(agent_id="agent-two", **ask).get(timeout=30)
    assert (first["cached"], hit["cached"], other["cached"]) == (False, True, False)
    assert hit["text"] == first["text"] and sim.stats()["calls"] == 2
    message = parse_message({"agent_id": "agent-one", **ask})
    entry = keys.cache_entry(request_key(message, cache_scope(message, {})))
    assert 0 < get_redis().ttl(entry) <= 60  # the message's TTL, not the default 300 s
    # Expiring is Redis's own work (SET ... EX): end the TTL now instead of waiting it out.
    get_redis().pexpire(entry, 1)
    wait_until(lambda: get_redis().exists(entry) == 0, "Redis to expire the cache entry")
    assert submit(agent_id="agent-one", **ask).get(timeout=30)["cached"] is False
    assert sim.stats()["calls"] == 3


def test_errors_are_not_cached(simulator: Sim, endpoint: MakeEndpoint) -> None:
    sim = simulator(error_rate=1.0)
    endpoint(sim, "flaky-cache")
    with pytest.raises(Exception, match="HTTP 500"):
        submit(agent_id="err-agent", prompt="hello", max_tokens=32).get(timeout=30)
    sim.configure(error_rate=0.0)
    result = submit(agent_id="err-agent", prompt="hello", max_tokens=32).get(timeout=30)
    assert result["cached"] is False and sim.stats()["calls"] == 2


def test_truncated_answers_are_not_cached(simulator: Sim, endpoint: MakeEndpoint) -> None:
    sim = simulator(completion_tokens=50)
    endpoint(sim, "truncating")
    for _ in range(2):
        result = submit(agent_id="trunc-agent", prompt="long story", max_tokens=5).get(timeout=30)
        assert result["finish_reason"] == "length" and result["cached"] is False
    assert sim.stats()["calls"] == 2


def test_no_cache_and_no_store(simulator: Sim, endpoint: MakeEndpoint) -> None:
    sim = simulator()
    endpoint(sim, "controls")
    ask = dict(agent_id="ctl-agent", prompt="controls", max_tokens=32)
    submit(**ask, no_store=True).get(timeout=30)
    assert submit(**ask).get(timeout=30)["cached"] is False  # nothing was stored
    assert submit(**ask, no_cache=True).get(timeout=30)["cached"] is False  # skips lookup
    assert submit(**ask).get(timeout=30)["cached"] is True
    assert sim.stats()["calls"] == 3


@pytest.mark.broker
def test_leader_killed_mid_call_every_follower_answered_every_call_charged_once(
    simulator: Sim, endpoint: MakeEndpoint, gate: MakeGate
) -> None:
    sim = simulator()
    held = gate(sim)
    endpoint(held, "kill-leader")
    agent = f"sf-kill-{uuid.uuid4().hex[:6]}"
    add_agent(agent)
    set_budget(agent, tokens=1_000_000)
    pending = [submit(agent_id=agent, prompt="survive the leader", max_tokens=16)
               for _ in range(20)]
    leader = held.wait_held()[0]  # the provider answered; the leader waits for the bytes
    os.kill(held.caller_pid(leader), signal.SIGKILL)
    held.open()
    results = [p.get(timeout=60) for p in pending]
    assert len({r["text"] for r in results}) == 1
    with session_scope() as session:
        ledger = list(session.scalars(select(LedgerRow).where(LedgerRow.agent_id == agent)))
    assert len(ledger) == sim.stats()["calls"] == 2  # the killed call and its redo, once each
    assert_budget_invariants()


def test_semantic_cache_hits_paraphrases_only_within_the_agent(
    simulator: Sim, endpoint: MakeEndpoint
) -> None:
    pytest.importorskip("sentence_transformers", reason="needs the [semantic] extra")
    sim = simulator()
    endpoint(sim, "semantic")

    def ask(agent: str, prompt: str) -> dict[str, object]:
        result: dict[str, object] = submit(agent_id=agent, prompt=prompt,
                                           max_tokens=32).get(timeout=90)
        return result

    first = ask("semantic-agent", "What is the capital city of France?")
    paraphrase = ask("semantic-agent", "What's the capital of France?")
    assert (first["cached"], paraphrase["cached"]) == (False, True)
    assert paraphrase["text"] == first["text"] and sim.stats()["calls"] == 1
    assert ask("semantic-other", "What's the capital of France?")["cached"] is False
    assert sim.stats()["calls"] == 2  # another agent's answer is never a candidate
    ask("semantic-agent", "Give me 3 facts about Paris")
    assert ask("semantic-agent", "Give me 5 facts about Paris")["cached"] is False
    assert sim.stats()["calls"] == 4
    assert cache.counters()["semantic_hits"] >= 1


def test_orphaned_flight_is_adopted_by_its_first_follower(simulator: Sim, endpoint: MakeEndpoint
                                                         ) -> None:
    import json

    from aimesh_tasks.tasks.flight import adopt_orphans

    sim = simulator()
    endpoint(sim, "orphan")
    followers = [parse_message({"agent_id": "orphan-agent", "prompt": "left behind",
                                "max_tokens": 32}) for _ in range(3)]
    key = request_key(followers[0], cache_scope(followers[0], {}))
    # A leader took the flight, three followers joined, then the leader's lease ran out.
    for message in followers:
        get_redis().rpush(keys.flight_followers(key),
                          json.dumps({"task_id": message.id, "message": message.to_json_dict()}))
    assert adopt_orphans() == 1
    results = [app.AsyncResult(m.id).get(timeout=30) for m in followers]
    assert len({r["text"] for r in results}) == 1
    assert sim.stats()["calls"] == 1  # the adopted follower led; the others were answered
    assert not get_redis().exists(keys.flight_followers(key))
