"""Budgets end to end: no overspend, no false rejection, every charge exactly once.

Real Postgres, real Redis, real worker processes (a prefork router worker and a prefork
endpoint worker), the simulator's own call log as the truth about upstream calls.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Callable
from datetime import timedelta
from decimal import Decimal
from typing import Any

import pytest
from celery.result import AsyncResult
from sqlalchemy import func, select

from aimesh_tasks import keys, outbox, submit
from aimesh_tasks.budgets import get_budget, reap, set_budget, worst_case
from aimesh_tasks.budgets.ledger import claim, reserve, settle
from aimesh_tasks.db import AuditRow, LedgerRow, ReservationRow, session_scope
from aimesh_tasks.errors import BudgetExceeded, InvalidInput, InvalidMessage, NotFound
from aimesh_tasks.governance.agents import add_agent
from aimesh_tasks.messages import parse_message
from aimesh_tasks.money import call_cost_nusd
from aimesh_tasks.pipeline import journal
from aimesh_tasks.providers.base import Completion
from aimesh_tasks.redis_client import get_redis
from aimesh_tasks.registry import Endpoint, add_endpoint
from aimesh_tasks.simulator import RunningSimulator
from tests.budget_checks import (
    assert_budget_invariants,
    blocked_batch,
    budget_row_locked,
    new_agent,
)
from tests.gate import Gate
from tests.waits import wait_until

pytestmark = pytest.mark.usefixtures("workers")

Sim = Callable[..., RunningSimulator]
MakeEndpoint = Callable[..., Endpoint]
PROMPT = "Summarise the quarterly report in two lines"


def _outcomes(pending: list[AsyncResult]) -> tuple[list[dict[str, Any]], list[BaseException]]:
    done, denied = [], []
    for async_result in pending:
        try:
            done.append(async_result.get(timeout=60))
        except BudgetExceeded as exc:
            denied.append(exc)
    return done, denied


def _ledger(agent_id: str) -> list[LedgerRow]:
    with session_scope() as session:
        return list(session.scalars(select(LedgerRow).where(LedgerRow.agent_id == agent_id)))


def _sim_cost_nusd(sim: RunningSimulator, endpoint: Endpoint) -> int:
    return sum(call_cost_nusd(c["prompt_tokens"], c["completion_tokens"],
                              endpoint.input_nusd_per_1k, endpoint.output_nusd_per_1k)
               for c in sim.calls() if c["status"] == 200)


@pytest.mark.parametrize("round_no", [1, 2, 3])
def test_race_admits_what_fits_never_overspends_never_falsely_rejects(
    simulator: Sim, endpoint: MakeEndpoint, round_no: int
) -> None:
    sim = simulator(completion_tokens=8)
    target = endpoint(sim, "race", price_in="0.001", price_out="0.002", capacity=1000)
    agent = new_agent(f"race{round_no}", None)
    need = worst_case(parse_message({"agent_id": agent, "prompt": f"{PROMPT} #000",
                                     "max_tokens": 64}), target)
    set_budget(agent, tokens=10 * need.tokens)
    # distinct prompts of one length: equal estimates, and no answer from the cache
    pending = [submit(agent_id=agent, prompt=f"{PROMPT} #{n:03d}", max_tokens=64)
               for n in range(200)]
    done, denied = _outcomes(pending)
    assert len(done) + len(denied) == 200
    assert len(done) >= 10
    budget = get_budget(agent)
    assert budget.spent_tokens <= 10 * need.tokens
    assert budget.reserved_tokens == 0
    assert sim.stats()["calls"] == len(done)  # a denied message never reached the provider
    assert len(_ledger(agent)) == len(done)
    outbox.flush(wait_s=10)
    with session_scope() as session:
        rows = list(session.scalars(select(AuditRow).where(AuditRow.agent_id == agent,
                                                           AuditRow.event == "denied")))
    assert len(rows) == len(denied)
    for row in rows:  # no false rejection: at that moment the estimate really did not fit
        d = row.detail
        assert d["token_limit"] - d["spent_tokens"] - d["reserved_tokens"] < d["needed_tokens"]
    assert_budget_invariants()


@pytest.mark.broker
def test_exhausted_budget_is_refused_with_what_was_needed_and_left(
    simulator: Sim, endpoint: MakeEndpoint
) -> None:
    sim = simulator()
    endpoint(sim, "tight", price_in="0.01", price_out="0.01")
    agent = new_agent("tight", None)
    set_budget(agent, usd="0.000001")
    with pytest.raises(BudgetExceeded) as caught:
        submit(agent_id=agent, prompt=PROMPT, max_tokens=64).get(timeout=30)
    assert "needs up to" in str(caught.value) and "are left" in str(caught.value)
    assert caught.value.fields["left_usd"] == "0.000001"
    assert sim.stats()["calls"] == 0
    assert_budget_invariants()


def test_unmetered_agent_is_not_reserved_or_charged(simulator: Sim, endpoint: MakeEndpoint
                                                    ) -> None:
    sim = simulator()
    endpoint(sim, "open")
    result = submit(agent_id="no-budget-agent", prompt=PROMPT).get(timeout=30)
    assert result["text"] and _ledger("no-budget-agent") == []


def test_fallback_call_is_reserved_at_its_own_price_and_both_calls_are_charged(
    simulator: Sim, endpoint: MakeEndpoint
) -> None:
    broken_sim, good_sim = simulator(error_rate=1.0), simulator()
    endpoint(broken_sim, "cheap-broken", price_in="0.001", price_out="0.001")
    good = endpoint(good_sim, "dear-good", price_in="0.004", price_out="0.004")
    agent = new_agent("fallback", None)
    set_budget(agent, usd="1")
    result = submit(agent_id=agent, prompt=PROMPT, max_tokens=32).get(timeout=30)
    assert result["endpoint_id"] == good.id
    ledger = sorted(_ledger(agent), key=lambda r: r.call_key)
    assert [(r.endpoint_id == good.id, r.nusd > 0) for r in ledger] == [(False, False),
                                                                          (True, True)]
    assert ledger[1].nusd == _sim_cost_nusd(good_sim, good)
    assert get_budget(agent).spent_usd == Decimal(result["cost_usd"])
    assert_budget_invariants()


@pytest.mark.broker
def test_redelivered_message_is_charged_once(simulator: Sim, endpoint: MakeEndpoint) -> None:
    sim = simulator()
    endpoint(sim, "redeliver")
    agent = new_agent("redeliver", None)
    set_budget(agent, tokens=100_000)
    message = parse_message({"agent_id": agent, "prompt": PROMPT, "max_tokens": 32,
                             "no_cache": True, "no_store": True})  # the ledger alone dedups
    first = submit(message).get(timeout=30)
    again = submit(message.to_json_dict()).get(timeout=30)  # the same message, published again
    assert again["text"] == first["text"] and again["message_id"] == first["message_id"]
    assert sim.stats()["calls"] == 1
    assert len(_ledger(agent)) == 1
    assert get_budget(agent).spent_tokens == first["input_tokens"] + first["output_tokens"]
    assert_budget_invariants()


def _failpoint_pid(name: str) -> int:
    """The pid of the worker process paused at failpoint `name` (it writes it on arrival)."""
    return int(wait_until(lambda: get_redis().get(keys.failpoint(name)),
                          f"a worker paused at failpoint {name}"))


@pytest.mark.broker
@pytest.mark.parametrize(("point", "agent_prefix"), [
    ("after_reserve", "kill-after-reserve"), ("before_settle", "kill-before-settle")])
def test_sigkill_between_reserve_call_and_settle_charges_exactly_the_calls_made(
    simulator: Sim, endpoint: MakeEndpoint, point: str, agent_prefix: str
) -> None:
    sim = simulator(completion_tokens=10)
    target = endpoint(sim, f"kill-{point.replace('_', '-')}")
    add_agent(agent_prefix) if not _agent_exists(agent_prefix) else None
    set_budget(agent_prefix, tokens=1_000_000)
    async_result = submit(agent_id=agent_prefix, prompt=PROMPT, max_tokens=32)
    os.kill(_failpoint_pid(point), signal.SIGKILL)
    result = async_result.get(timeout=60)
    assert result["text"]
    reap(older_than_s=0)
    ledger = _ledger(agent_prefix)
    budget = get_budget(agent_prefix)
    assert sum(r.nusd for r in ledger) == budget.spent_usd * 10**9 == _sim_cost_nusd(sim, target)
    assert sum(r.tokens for r in ledger) == budget.spent_tokens
    assert sim.stats()["calls"] == 1
    assert_budget_invariants()


def test_router_killed_while_its_reserve_batch_waits_in_postgres_reserves_once(
    simulator: Sim, endpoint: MakeEndpoint
) -> None:
    """The writer killed mid-batch: the router process whose reservation batch is inside
    Postgres (waiting for the budget row another transaction holds) is SIGKILLed. The
    batch then commits without its caller, or not at all; either way the redelivered
    message reserves once, calls once, and is charged exactly what the provider billed."""
    sim = simulator(completion_tokens=10)
    target = endpoint(sim, "kill-mid-reserve")
    agent = new_agent("kill-mid-reserve", None)
    set_budget(agent, tokens=1_000_000)
    with budget_row_locked(agent):
        async_result = submit(agent_id=agent, prompt=PROMPT, max_tokens=32)
        _, sender = wait_until(blocked_batch, "the router's reserve batch waiting for the row")
        os.kill(int(sender.removeprefix("aimesh-")), signal.SIGKILL)
    assert async_result.get(timeout=90)["text"]
    with session_scope() as session:
        held = list(session.scalars(select(ReservationRow.state)
                                    .where(ReservationRow.agent_id == agent)))
    assert held == ["settled"]
    assert sim.stats()["calls"] == 1
    assert sum(r.nusd for r in _ledger(agent)) == _sim_cost_nusd(sim, target)
    assert_budget_invariants()


def test_endpoint_worker_killed_while_its_settle_batch_waits_charges_the_call_once(
    simulator: Sim, endpoint: MakeEndpoint, gate: Callable[[RunningSimulator], Gate]
) -> None:
    """The writer killed mid-batch, at settle: the provider has answered (held at a gate
    until the budget row is locked), the call is journalled, and the endpoint worker
    whose settle batch waits in Postgres is SIGKILLed. The redelivery finds the journal:
    one upstream call, charged once at its actual usage."""
    sim = simulator(completion_tokens=10)
    held = gate(sim)
    target = endpoint(held, "kill-mid-settle")
    agent = new_agent("kill-mid-settle", None)
    set_budget(agent, tokens=1_000_000)
    async_result = submit(agent_id=agent, prompt=PROMPT, max_tokens=32)
    caller = held.caller_pid(held.wait_held(1)[0])
    with budget_row_locked(agent):
        held.open()
        _, sender = wait_until(blocked_batch, "the endpoint worker's settle batch waiting")
        assert sender == f"aimesh-{caller}"
        os.kill(caller, signal.SIGKILL)
    assert async_result.get(timeout=90)["text"]
    assert sim.stats()["calls"] == 1
    ledger = _ledger(agent)
    assert [r.kind for r in ledger] == ["call"]
    assert ledger[0].nusd == _sim_cost_nusd(sim, target)
    assert_budget_invariants()


def _agent_exists(agent_id: str) -> bool:
    from aimesh_tasks.db import AgentRow

    with session_scope() as session:
        return session.get(AgentRow, agent_id) is not None


def _held(agent: str, target: Endpoint, call_key: str) -> None:
    message = parse_message({"agent_id": agent, "prompt": PROMPT, "max_tokens": 16})
    reserve(agent, message.id, target.id, call_key, worst_case(message, target))


def test_reaper_settles_by_what_it_knows_of_each_stale_reservation(
    simulator: Sim, endpoint: MakeEndpoint
) -> None:
    target = endpoint(simulator(), "reaped")
    agent = new_agent("reaper", None)
    set_budget(agent, tokens=100_000)
    _held(agent, target, "never-called:0")
    _held(agent, target, "claimed-no-answer:0")
    claim("claimed-no-answer:0")
    _held(agent, target, "answered:0")
    claim("answered:0")
    journal.record("answered:0", Completion("hi", 7, 3, "m"), cost_nusd=123)
    assert reap(older_than_s=0) == {"released": 1, "settled_estimate": 1, "settled_actual": 1}
    with session_scope() as session:
        states = dict(session.execute(select(ReservationRow.call_key, ReservationRow.state)
                                      .where(ReservationRow.agent_id == agent)).all())
        charged = {r.call_key: (r.tokens, r.nusd) for r in _ledger(agent)}
        estimate = session.scalar(select(ReservationRow.tokens)
                                  .where(ReservationRow.call_key == "claimed-no-answer:0"))
    assert states == {"never-called:0": "released", "claimed-no-answer:0": "settled",
                      "answered:0": "settled"}
    assert charged["answered:0"] == (10, 123)
    assert charged["claimed-no-answer:0"][0] == estimate
    assert "never-called:0" not in charged
    assert settle("answered:0", 1, 1) is False  # a late settle changes nothing
    assert_budget_invariants()


def _backdate_period(agent_id: str, by: timedelta) -> None:
    """Move the budget's period start back: to the budget, exactly as if `by` had passed
    (the fast path compares with Postgres now(), the general path with utcnow())."""
    from aimesh_tasks.db import BudgetRow

    with session_scope() as session:
        row = session.get(BudgetRow, agent_id, with_for_update=True)
        assert row is not None
        row.period_start -= by


def test_rolling_period_reset_is_recorded(simulator: Sim, endpoint: MakeEndpoint) -> None:
    from aimesh_tasks.db import BudgetResetRow

    sim = simulator()
    endpoint(sim, "rolling")
    agent = new_agent("rolling", None)
    window = timedelta(hours=1)  # no wall-clock window can close during the test
    set_budget(agent, tokens=100_000, period="rolling", rolling_s=int(window.total_seconds()))
    submit(agent_id=agent, prompt=PROMPT, no_cache=True).get(timeout=30)
    spent = get_budget(agent).spent_tokens
    assert spent > 0
    _backdate_period(agent, 1.5 * window)  # the first call now lies one and a half windows ago
    started = get_budget(agent).period_start
    submit(agent_id=agent, prompt=PROMPT, no_cache=True).get(timeout=30)
    with session_scope() as session:
        resets = list(session.scalars(select(BudgetResetRow)
                                      .where(BudgetResetRow.agent_id == agent)))
    assert [(r.spent_tokens, r.period_start, r.new_period_start) for r in resets] == [
        (spent, started, started + window)]  # the window it fell in, counted from the start
    budget = get_budget(agent)
    assert budget.period_start == started + window
    assert budget.spent_tokens == spent  # the second call alone, same size
    assert_budget_invariants()


@pytest.mark.parametrize(("fields", "error", "words"), [
    ({"tokens": -5}, InvalidInput, "0 or more"),
    ({"tokens": "lots"}, InvalidInput, "whole number"),
    ({"usd": "-1"}, InvalidInput, "0 or more"),
    ({"usd": "ten dollars"}, InvalidInput, "not a decimal"),
    ({"usd": 0.5}, InvalidInput, "not a float"),
    ({"period": "weekly", "tokens": 5}, InvalidInput, "period"),
    ({"period": "rolling", "tokens": 5}, InvalidInput, "rolling_s"),
    ({}, InvalidInput, "give a token limit"),
])
def test_bad_budget_input_is_refused_and_nothing_changes(
    clean: None, fields: dict[str, Any], error: type[Exception], words: str
) -> None:
    agent = new_agent("bad-input", None)
    set_budget(agent, tokens=100)
    with pytest.raises(error, match=words):
        set_budget(agent, **fields)
    assert get_budget(agent).token_limit == 100


def test_unknown_agent_unpriced_model_and_huge_max_tokens_are_clear_errors(clean: None
                                                                          ) -> None:
    with pytest.raises(NotFound, match="aimesh agents add"):
        set_budget("ghost-agent", tokens=5)
    with pytest.raises(InvalidInput, match="input_usd_per_1k"):
        add_endpoint(id="unpriced", base_url="http://127.0.0.1:9", model="m",
                     input_usd_per_1k=None, output_usd_per_1k="0.1")  # type: ignore[arg-type]
    with pytest.raises(InvalidMessage, match="max_tokens"):
        submit(agent_id="a", prompt="x", max_tokens=10**9)
    with session_scope() as session:
        assert session.scalar(select(func.count()).select_from(LedgerRow)) == 0


def test_budgets_cli_sets_and_shows_and_refuses_bad_input(clean: None) -> None:
    import json

    from typer.testing import CliRunner

    from aimesh_tasks.cli.main import cli

    runner = CliRunner()
    agent = new_agent("cli-budget", None)
    done = runner.invoke(cli, ["budgets", "set", agent, "--tokens", "500", "--usd", "1.25",
                               "--period", "monthly"])
    assert done.exit_code == 0, done.output
    shown = runner.invoke(cli, ["budgets", "show", agent, "--json"])
    view = json.loads(shown.output)
    assert (view["token_limit"], view["usd_limit"], view["period"]) == (500, "1.25", "monthly")
    bad = runner.invoke(cli, ["budgets", "set", agent, "--usd", "lots"])
    assert bad.exit_code == 2 and "usd: 'lots' is not a decimal number" in bad.stderr
    assert get_budget(agent).usd_limit == Decimal("1.25")


def test_metered_mirror_is_trusted_only_while_complete(clean: None) -> None:
    from aimesh_tasks.budgets.metered import is_metered, rebuild

    agent = new_agent("mirror", None)
    set_budget(agent, tokens=10)
    get_redis().flushdb()  # Redis lost the mirror: unsure, never "unmetered"
    assert is_metered(agent) is None and is_metered("someone-else") is None
    rebuild()
    assert is_metered(agent) is True and is_metered("someone-else") is False
    later = new_agent("mirror-later", None)
    set_budget(later, tokens=10)
    assert is_metered(later) is True
