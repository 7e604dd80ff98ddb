"""Answers kept with their settlement (pipeline/durable.py): a Redis that lost the call
journal, the hand-off and the lease does not make a settled call again.

The message path runs here as plain functions (`pipeline.routing.route`,
`pipeline.calling.call`) on real Redis, Postgres and the simulator. "Redis lost its data"
is a FLUSHDB of the live-figures db between two deliveries; routing the message again is
what the reconciler's re-publish does, calling the same envelope again what a task
retried across the outage does. The simulator's call log is the truth about upstream
calls.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import timedelta
from decimal import Decimal
from typing import Any

import pytest
from sqlalchemy import select, update

from aimesh_tasks import keys, outbox
from aimesh_tasks.app import app
from aimesh_tasks.budgets import set_budget
from aimesh_tasks.budgets.ledger import claim
from aimesh_tasks.budgets.reaper import forget_old
from aimesh_tasks.db import LedgerRow, ReservationRow, session_scope
from aimesh_tasks.envelope import Envelope
from aimesh_tasks.governance import add_agent
from aimesh_tasks.messages import AiMessage, utcnow
from aimesh_tasks.pipeline import calling, journal, routing
from aimesh_tasks.pipeline.outcomes import Done, Fallback, HandOff
from aimesh_tasks.policies import Policies
from aimesh_tasks.policies.budget import BudgetAdmission
from aimesh_tasks.redis_client import get_redis
from aimesh_tasks.registry import Endpoint, set_enabled
from aimesh_tasks.settings import reset_settings
from aimesh_tasks.simulator import RunningSimulator

pytestmark = pytest.mark.usefixtures("clean")
AGENT = "durable-agent"


def _metered() -> None:
    add_agent(AGENT)
    set_budget(AGENT, usd="1")


def _message() -> AiMessage:
    return AiMessage(agent_id=AGENT, prompt="what is a write-ahead log?", max_tokens=16)


def _route(message: AiMessage) -> Envelope:
    outcome = routing.route(app, message, policies=Policies([BudgetAdmission()]))
    assert isinstance(outcome, HandOff), outcome
    return outcome.envelope


def _call(envelope: Envelope) -> Any:
    return calling.call(app, envelope, wait_s=5.0, policies=Policies([BudgetAdmission()]))


def _redis_loses_everything() -> None:
    """What a Redis restarted without its AOF keeps: nothing (the outbox is flushed
    first: audit rows are not what this is about)."""
    outbox.flush(wait_s=5)
    get_redis().flushdb()


def _billed(sim: RunningSimulator) -> list[str]:
    return [str(c["call_key"]) for c in sim.calls() if c["status"] == 200]


def _ledger(message_id: str) -> list[tuple[str, str, int]]:
    with session_scope() as session:
        rows = session.scalars(select(LedgerRow).where(LedgerRow.message_id == message_id)
                               .order_by(LedgerRow.id))
        return [(r.call_key, r.kind, r.nusd) for r in rows]


def _kept(call_key: str) -> dict[str, Any] | None:
    with session_scope() as session:
        row = session.get(ReservationRow, call_key)
        assert row is not None, f"no reservation {call_key}"
        return row.journal_entry


def test_a_settled_call_is_answered_from_its_settlement_after_redis_lost_its_journal(
        simulator: Callable[..., RunningSimulator], endpoint: Callable[..., Endpoint]) -> None:
    sim = simulator()
    endpoint(sim, "durable-one")
    _metered()
    message = _message()
    first = _call(_route(message))
    assert isinstance(first, Done)
    call_key = keys.call_key(message.id, 0)
    kept = _kept(call_key)
    assert kept is not None and kept["completion"]["text"] == first.result["text"]
    assert kept == journal.entry_of(call_key), "the settlement keeps the journal's entry"

    _redis_loses_everything()
    again = _call(_route(message))

    assert isinstance(again, Done)
    assert _billed(sim) == [call_key], "the provider was called again"
    for field in ("text", "input_tokens", "output_tokens", "endpoint_id", "cost_usd",
                  "charged_usd"):
        assert again.result[field] == first.result[field], field
    assert [(k, kind) for k, kind, _ in _ledger(message.id)] == [(call_key, "call")]
    assert journal.entry_of(call_key) == kept, "journalled in Redis again"
    assert get_redis().get(keys.call_lease(call_key)) is None, "the lease was given back"
    assert not get_redis().zrange(keys.live_inflight(again.result["endpoint_id"]), 0, -1)


def test_a_call_task_run_again_across_the_outage_is_answered_from_its_settlement(
        simulator: Callable[..., RunningSimulator], endpoint: Callable[..., Endpoint]) -> None:
    """The call settled, then Redis went away before the task could finish: the task is
    retried with the same envelope, against a Redis that came back empty."""
    sim = simulator()
    endpoint(sim, "durable-retried")
    _metered()
    message = _message()
    envelope = _route(message)
    first = _call(envelope)
    assert isinstance(first, Done)
    _redis_loses_everything()
    again = _call(envelope)
    assert isinstance(again, Done) and again.result["text"] == first.result["text"]
    assert len(_billed(sim)) == 1
    assert [kind for _, kind, _ in _ledger(message.id)] == ["call"]


def test_with_durable_answers_off_the_call_is_made_again(
        simulator: Callable[..., RunningSimulator], endpoint: Callable[..., Endpoint],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """What the setting buys: off, nothing is kept and the same loss costs a second call
    (and charge, under a redo key)."""
    monkeypatch.setenv("AIMESH_DURABLE_ANSWERS", "false")
    reset_settings()
    sim = simulator()
    endpoint(sim, "durable-off")
    _metered()
    message = _message()
    assert isinstance(_call(_route(message)), Done)
    call_key = keys.call_key(message.id, 0)
    assert _kept(call_key) is None
    _redis_loses_everything()
    assert isinstance(_call(_route(message)), Done)
    assert len(_billed(sim)) == 2
    assert len(_ledger(message.id)) == 2


def test_a_failed_call_repeats_its_fallback_and_the_next_call_is_answered_from_its_own(
        simulator: Callable[..., RunningSimulator], endpoint: Callable[..., Endpoint]) -> None:
    broken_sim, good_sim = simulator(error_rate=1.0), simulator()
    broken = endpoint(broken_sim, "durable-broken", price_in="0.0001", price_out="0.0001")
    good = endpoint(good_sim, "durable-good")
    _metered()
    message = _message()
    fell = _call(_route(message))
    assert isinstance(fell, Fallback) and fell.envelope.route[0]["id"] == good.id
    first = _call(fell.envelope)
    assert isinstance(first, Done)
    assert _kept(keys.call_key(message.id, 0)) == {"error": fell.envelope.attempts[0]["error"],
                                                    "cost_nusd": 0}

    _redis_loses_everything()
    envelope = _route(message)
    assert envelope.route[0]["id"] == broken.id
    again = _call(envelope)
    assert isinstance(again, Fallback)
    assert again.envelope.route == fell.envelope.route
    done = _call(again.envelope)
    assert isinstance(done, Done) and done.result["text"] == first.result["text"]
    assert len([c for c in broken_sim.calls()]) == 1 and len(_billed(good_sim)) == 1
    assert [kind for _, kind, _ in _ledger(message.id)] == ["call", "call"]


def test_an_answer_of_a_takeovers_redo_is_found_under_the_redo_key(
        simulator: Callable[..., RunningSimulator], endpoint: Callable[..., Endpoint]) -> None:
    """A delivery died after claiming the call (charged `lost`, called again under a redo
    key by the next one); Redis then forgot the redo pointer too."""
    sim = simulator()
    endpoint(sim, "durable-redo")
    _metered()
    message = _message()
    envelope = _route(message)
    call_key = keys.call_key(message.id, 0)
    assert claim(call_key) == "claimed"  # the delivery that died mid-call
    first = _call(envelope)
    assert isinstance(first, Done)
    [redo] = _billed(sim)
    assert redo.startswith(f"{call_key}:redo-")

    _redis_loses_everything()
    again = _call(_route(message))
    assert isinstance(again, Done) and again.result["text"] == first.result["text"]
    assert again.result["charged_usd"] == first.result["charged_usd"], (
        "the message's whole charge, the lost call's included")
    assert Decimal(again.result["charged_usd"]) > Decimal(again.result["cost_usd"])
    assert _billed(sim) == [redo]
    assert [kind for _, kind, _ in _ledger(message.id)] == ["lost", "call"]
    assert get_redis().get(keys.call_charged(call_key)) == redo


def test_an_answer_is_credited_to_the_endpoint_that_gave_it_when_routing_chose_another(
        simulator: Callable[..., RunningSimulator], endpoint: Callable[..., Endpoint]) -> None:
    cheap_sim, dear_sim = simulator(), simulator()
    cheap = endpoint(cheap_sim, "durable-cheap", price_in="0.0001", price_out="0.0001")
    dear = endpoint(dear_sim, "durable-dear", price_in="0.01", price_out="0.02")
    _metered()
    message = _message()
    first = _call(_route(message))
    assert isinstance(first, Done) and first.result["endpoint_id"] == cheap.id

    _redis_loses_everything()
    set_enabled(cheap.id, False)
    envelope = _route(message)
    assert envelope.route[0]["id"] == dear.id
    again = _call(envelope)
    assert isinstance(again, Done)
    assert again.result["endpoint_id"] == cheap.id
    assert Decimal(again.result["cost_usd"]) == Decimal(first.result["cost_usd"])
    assert dear_sim.calls() == [] and len(_billed(cheap_sim)) == 1


def test_kept_answers_go_with_their_reservations_after_the_journals_retention(
        simulator: Callable[..., RunningSimulator], endpoint: Callable[..., Endpoint]) -> None:
    sim = simulator()
    endpoint(sim, "durable-old")
    _metered()
    old, recent = _message(), AiMessage(agent_id=AGENT, prompt="another", max_tokens=16)
    for message in (old, recent):
        assert isinstance(_call(_route(message)), Done)
    old_key, recent_key = keys.call_key(old.id, 0), keys.call_key(recent.id, 0)
    past = utcnow() - timedelta(seconds=journal.retention_s() + 60)
    with session_scope() as session:
        session.execute(update(ReservationRow).where(ReservationRow.call_key == old_key)
                        .values(closed_at=past))
    assert forget_old() == 1
    assert forget_old() == 0
    with session_scope() as session:
        assert session.get(ReservationRow, old_key) is None  # the answer with it
        charged = set(session.scalars(select(LedgerRow.call_key)))
    assert {old_key, recent_key} <= charged  # the record of the charge stays
    assert json.dumps(_kept(recent_key))
    # The same message published again, days later, when Redis has forgotten it too: its
    # ledger row says the call key was charged, so it is called under a new key and
    # charged once more, never a second ledger row for one key (nor a failed batch).
    _redis_loses_everything()
    again = _call(_route(old))
    assert isinstance(again, Done)
    (redo,) = [key for key in _billed(sim) if key.startswith(f"{old_key}:redo-")]
    assert [(key, kind) for key, kind, _ in _ledger(old.id)] == [(old_key, "call"),
                                                                  (redo, "call")]
