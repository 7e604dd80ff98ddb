"""Resilience: retries that honour Retry-After, one circuit breaker per endpoint shared by
every worker, deadlines end to end, priorities on the broker.

Three kinds of test, on real Redis and Postgres throughout:
- the breaker's Redis scripts and the retry arithmetic, at explicit instants (`now`), so
  cooldowns "pass" without waiting;
- the message path as plain functions (`routing.route`, `calling.call`) in this process,
  with the policies given explicitly (both all-open settings, refusal → fallback);
- end to end through the session's worker processes, with the simulator scripted per
  endpoint and a relay (tests/relay.py) that stamps when each call arrived and can hold
  answers, so that a wait is measured from the relay's stamps and a worker is moved one
  call at a time, never raced against the clock.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import replace
from datetime import timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
import redis
from celery.result import AsyncResult
from kombu import Connection
from sqlalchemy import select
from typer.testing import CliRunner

from aimesh_tasks import keys, submit
from aimesh_tasks.app import app, check_countdowns
from aimesh_tasks.db import LedgerRow, ReservationRow, session_scope
from aimesh_tasks.envelope import Envelope
from aimesh_tasks.errors import (
    AllEndpointsFailed,
    ConfigError,
    DeadlineExceeded,
    NoEndpointAvailable,
    ProviderError,
)
from aimesh_tasks.messages import AiMessage, utcnow
from aimesh_tasks.observability.exporter import ClusterCollector, queue_depths
from aimesh_tasks.pipeline import calling, routing
from aimesh_tasks.pipeline.call import endpoint_to_args
from aimesh_tasks.pipeline.outcomes import Done, Failed, Fallback, HandOff, Refused, Retry
from aimesh_tasks.policies import CallContext, Policies
from aimesh_tasks.policies.budget import BudgetAdmission
from aimesh_tasks.providers.gemini import Gemini
from aimesh_tasks.providers.http import call_timeout
from aimesh_tasks.redis_batch import Batch
from aimesh_tasks.redis_client import get_redis
from aimesh_tasks.registry import Endpoint
from aimesh_tasks.registry.live import reset_figures
from aimesh_tasks.resilience.breaker import CircuitBreaker
from aimesh_tasks.resilience.breaker_store import (
    BreakerConfig,
    admit,
    read_states,
    record,
)
from aimesh_tasks.resilience.priority import broker_priority
from aimesh_tasks.resilience.retry import RetryLimits, RetryPolicy, retry_delay_s
from aimesh_tasks.routing import decisions_for
from aimesh_tasks.settings import Settings, get_settings
from aimesh_tasks.simulator import RunningSimulator
from aimesh_tasks.tasks import route_message
from tests.budget_checks import new_agent
from tests.conftest import BROKER_DB, REDIS, SLOT
from tests.processes import WorkerProcess
from tests.relay import Relay
from tests.waits import wait_until

pytestmark = pytest.mark.usefixtures("clean")

Sim = Callable[..., RunningSimulator]
MakeEndpoint = Callable[..., Endpoint]
MakeRelay = Callable[..., Relay]
CFG = BreakerConfig(failures=3, failure_rate=0.5, min_calls=4, window_s=60, cooldown_s=10,
                    cooldown_max_s=40, probes=2, probe_ttl_s=95)
T0 = 1_000_000.0
DATA = Path(__file__).parent / "data" / "providers"


@pytest.fixture()
def relay() -> Iterator[MakeRelay]:
    """Start relays in front of simulators (tests/relay.py); closed after the test."""
    made: list[Relay] = []

    def make(sim: RunningSimulator, **options: Any) -> Relay:
        made.append(Relay(sim.url, **options))
        return made[-1]

    yield make
    for each in made:
        each.close()


def _eid() -> str:
    return f"brk-{uuid.uuid4().hex[:8]}"


def _ledger(message_id: str) -> list[LedgerRow]:
    with session_scope() as session:
        return list(session.scalars(select(LedgerRow).where(LedgerRow.message_id == message_id)
                                    .order_by(LedgerRow.call_key)))


def _reservations(message_id: str) -> list[ReservationRow]:
    with session_scope() as session:
        return list(session.scalars(select(ReservationRow)
                                    .where(ReservationRow.message_id == message_id)
                                    .order_by(ReservationRow.call_key)))


def _open(endpoint_id: str, now: float, cooldown_s: float) -> None:
    """Open an endpoint's breaker as another worker would: one failure over the limit."""
    config = BreakerConfig(failures=1, cooldown_s=cooldown_s, cooldown_max_s=max(cooldown_s, 1))
    assert record(endpoint_id, f"opener-{uuid.uuid4().hex[:6]}", ok=False, epoch=0, now=now,
                  config=config) == "opened"


def _cooldown_over(endpoint_id: str) -> None:
    """Move an open breaker's cooldown end to the past (the cooldown 'passes')."""
    get_redis().hset(keys.breaker(endpoint_id), "open_until", repr(time.time() - 1))


# --- the breaker's scripts, at explicit instants ----------------------------------------


def test_consecutive_failures_open_the_breaker_and_a_success_resets_the_count() -> None:
    eid = _eid()
    config = replace(CFG, min_calls=100)  # the failure share alone would open it here
    assert [record(eid, f"c{i}", ok=False, epoch=0, now=T0, config=config)
            for i in range(2)] == ["counted", "counted"]
    assert record(eid, "ok", ok=True, epoch=0, now=T0, config=config) == "counted"
    outcomes = [record(eid, f"d{i}", ok=False, epoch=0, now=T0 + 1, config=config)
                for i in range(3)]
    assert outcomes == ["counted", "counted", "opened"]
    state = read_states([eid], T0 + 1)[eid]
    assert (state.state, state.epoch, state.open_until, state.cooldown_s) == (
        "open", 1, T0 + 11, 10)
    assert state.current(T0 + 10.9) == "open" and state.current(T0 + 11) == "half_open"


def test_a_failure_share_over_the_window_opens_it_and_old_calls_age_out() -> None:
    eid = _eid()
    # Two old failures, outside the 60 s window by the time the share is taken.
    record(eid, "old-1", ok=False, epoch=0, now=T0 - 100, config=CFG)
    record(eid, "old-2", ok=True, epoch=0, now=T0 - 100, config=CFG)
    steps = [("a", False), ("b", True), ("c", False), ("d", True)]
    assert [record(eid, k, ok=ok, epoch=0, now=T0, config=CFG) for k, ok in steps] == [
        "counted"] * 4  # 2 of 4 failed: 50 % is not above 50 %
    assert record(eid, "e", ok=False, epoch=0, now=T0, config=CFG) == "opened"  # 3 of 5


def test_half_open_admits_exactly_k_probes_under_concurrent_admissions() -> None:
    eid = _eid()
    for i in range(3):
        record(eid, f"f{i}", ok=False, epoch=0, now=T0, config=CFG)
    assert admit(eid, "early", T0 + 5, CFG).kind == "open"
    barrier = threading.Barrier(20)
    kinds: list[str] = []

    def one(n: int) -> None:
        barrier.wait()
        kinds.append(admit(eid, f"p{n}", T0 + 11, CFG).kind)

    threads = [threading.Thread(target=one, args=(n,)) for n in range(20)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(kinds).count("probe") == CFG.probes == 2
    assert kinds.count("probing") == 18
    state = read_states([eid], T0 + 11)[eid]
    assert (state.state, state.probes, state.exclusion(T0 + 11, 2) is not None) == (
        "half_open", 2, True)


def test_a_probe_success_closes_it_and_the_other_probes_late_answer_is_stale() -> None:
    eid = _eid()
    for i in range(3):
        record(eid, f"f{i}", ok=False, epoch=0, now=T0, config=CFG)
    first, second = admit(eid, "p1", T0 + 11, CFG), admit(eid, "p2", T0 + 11, CFG)
    assert first.kind == second.kind == "probe" and first.epoch == second.epoch == 2
    assert record(eid, "p1", ok=True, epoch=first.epoch, now=T0 + 12, config=CFG) == "closed"
    assert record(eid, "p2", ok=False, epoch=second.epoch, now=T0 + 13, config=CFG) == "stale"
    state = read_states([eid], T0 + 13)[eid]
    assert (state.state, state.failures, state.cooldown_s) == ("closed", 0, 10)


def _probe_outcome(error: ProviderError | None, message: AiMessage) -> tuple[str, int, str]:
    """A half-open breaker (one probe slot) whose probe, admitted through the policy's own
    hooks, ends with `error`: (the state after, probes in flight, a next call's admission)."""
    config = replace(CFG, probes=1)
    eid = _eid()
    for i in range(3):
        record(eid, f"f{i}", ok=False, epoch=0, now=T0, config=config)
    breaker = CircuitBreaker(config, clock=lambda: T0 + 11)
    endpoint = Endpoint(id=eid, provider="openai", base_url="http://127.0.0.1:9", model="m",
                        api_key_env=None, input_nusd_per_1k=1, output_nusd_per_1k=1,
                        capacity=8, tags=frozenset(), enabled=True)
    envelope = Envelope(message=message.to_json_dict(), route=[endpoint_to_args(endpoint)])
    ctx = CallContext(message, envelope, endpoint, call_key=f"probe-{uuid.uuid4().hex[:6]}")
    reads = Batch()
    read = breaker.queue_call_reads(reads, ctx)
    reads.send()
    ctx.reads[breaker.name] = read()
    assert breaker.before_call(ctx) is None, "the probe is admitted"
    assert read_states([eid], T0 + 11)[eid].probes == 1
    records = Batch()
    breaker.queue_call_records(records, ctx, error)
    records.send()
    after = read_states([eid], T0 + 11.5)[eid]
    return after.state, after.probes, admit(eid, "next", T0 + 11.5, config).kind


def test_a_probe_cut_short_on_our_side_is_not_counted_and_frees_its_slot() -> None:
    """A probe cancelled (the hedge or race it was in answered first) or stopped by its
    message's deadline says nothing of the endpoint: the breaker stays half-open, and its
    slot is free for the next call at once, not after probe_ttl_s. An answer closes it,
    a timeout of the endpoint's own reopens it."""
    live = _message("probe-agent")
    expired = live.model_copy(update={"deadline": utcnow() - timedelta(seconds=1)})
    cancelled = ProviderError("the call was cancelled in flight", endpoint_id="e",
                              action="fail", reason="cancelled", maybe_billed=True,
                              retryable=False)
    timeout = ProviderError("timed out", endpoint_id="e", action="fallback", reason="timeout")
    assert _probe_outcome(cancelled, live) == ("half_open", 0, "probe")
    assert _probe_outcome(timeout, expired) == ("half_open", 0, "probe")
    assert _probe_outcome(None, live) == ("closed", 0, "closed")
    assert _probe_outcome(timeout, live)[0] == "open"


def test_a_failed_probe_reopens_it_with_a_doubled_cooldown_up_to_the_cap() -> None:
    eid = _eid()
    for i in range(3):
        record(eid, f"f{i}", ok=False, epoch=0, now=T0, config=CFG)
    now, cooldowns = T0, []
    for n in range(4):
        now = read_states([eid], now)[eid].open_until
        probe = admit(eid, f"probe-{n}", now, CFG)
        assert probe.kind == "probe"
        assert record(eid, f"probe-{n}", ok=False, epoch=probe.epoch, now=now,
                      config=CFG) == "reopened"
        cooldowns.append(read_states([eid], now)[eid].cooldown_s)
    assert cooldowns == [20, 40, 40, 40]  # doubled from 10, capped at 40


def test_the_recool_case_a_late_failure_lengthens_a_cooldown_and_a_late_success_is_ignored(
) -> None:
    """BerriAI/litellm#40130: a deployment re-cooled by a slower failing request returned
    to rotation at the first, shorter deadline. Here a call admitted before the breaker
    opened that fails later, asking for longer, lengthens the cooldown; one asking for
    less never shortens it; a late success neither closes it nor enters a window."""
    eid = _eid()
    for i in range(3):
        record(eid, f"f{i}", ok=False, epoch=0, now=T0, config=CFG)
    assert read_states([eid], T0)[eid].open_until == T0 + 10
    assert record(eid, "slow-429", ok=False, epoch=0, now=T0 + 1, config=CFG,
                  retry_after_s=30) == "extended"
    assert record(eid, "slower-429", ok=False, epoch=0, now=T0 + 2, config=CFG,
                  retry_after_s=5) == "stale"
    assert record(eid, "late-ok", ok=True, epoch=0, now=T0 + 3, config=CFG) == "stale"
    state = read_states([eid], T0 + 12)[eid]
    assert (state.state, state.open_until, state.current(T0 + 12)) == ("open", T0 + 31, "open")
    assert admit(eid, "next", T0 + 12, CFG).kind == "open"
    assert get_redis().zcard(keys.breaker_calls(eid)) == 0


# --- the retry arithmetic -------------------------------------------------------------


LIMITS = RetryLimits(max_attempts=2, base_s=0.5, max_delay_s=30, max_total_delay_s=60)


def _delay(**given: Any) -> float | None:
    inputs: dict[str, Any] = {"retry_after_s": None, "retries_so_far": 0, "waited_s": 0.0,
                              "remaining_s": None, "p50_s": 0.0, "limits": LIMITS, **given}
    return retry_delay_s(**inputs)


def test_retry_after_is_a_floor_and_the_backoff_is_full_jitter_within_its_window() -> None:
    assert _delay(retry_after_s=1.0) == 1.0  # the backoff window of retry 1 is 0.5 s
    assert _delay(retry_after_s=7.5, retries_so_far=1) == 7.5
    seconds = [_delay(retries_so_far=1) for _ in range(200)]  # retry 2: uniform(0, 1)
    assert all(s is not None and 0 <= s <= 1.0 for s in seconds)
    assert max(s for s in seconds if s is not None) > 0.5  # the window doubled


def test_retries_are_bounded_by_attempts_wait_total_and_deadline() -> None:
    assert _delay(retries_so_far=2) is None
    assert _delay(retry_after_s=31) is None  # a longer wait than allowed: fall back
    assert _delay(retry_after_s=5, waited_s=56) is None
    assert _delay(retry_after_s=1, remaining_s=0.9) is None
    assert _delay(retry_after_s=1, remaining_s=1.5, p50_s=0.6) is None
    assert _delay(retry_after_s=1, remaining_s=1.5, p50_s=0.2) == 1.0


def test_gemini_retry_delay_in_the_body_is_the_errors_retry_after() -> None:
    body = json.loads((DATA / "gemini" / "error_429_per_minute.json").read_text())
    verdict = Gemini().classify_error(429, body, {})
    assert (verdict.action, verdict.retry_after_s) == ("retry", 26.0)
    assert Gemini().classify_error(500, {"error": {"status": "INTERNAL"}}, {}
                                   ).retry_after_s is None


def test_a_countdown_longer_than_half_the_visibility_timeout_is_refused_at_start() -> None:
    with pytest.raises(ConfigError) as caught:
        check_countdowns(Settings(retry_max_delay_s=151, visibility_timeout_s=300))
    assert "AIMESH_RETRY_MAX_DELAY_S" in str(caught.value)
    assert "AIMESH_VISIBILITY_TIMEOUT_S" in str(caught.value)
    check_countdowns(Settings(retry_max_delay_s=150, visibility_timeout_s=300))
    with pytest.raises(ConfigError, match="AIMESH_BREAKER_COOLDOWN_MAX_S"):
        check_countdowns(Settings(breaker_all_open="soonest", breaker_cooldown_max_s=200))


def test_the_provider_timeout_never_exceeds_the_time_left() -> None:
    plain = AiMessage(agent_id="t", prompt="p")
    assert call_timeout(plain).read_s == get_settings().provider_timeout_s
    soon = AiMessage(agent_id="t", prompt="p", deadline=utcnow() + timedelta(seconds=2))
    timeout = call_timeout(soon)
    assert 0 < timeout.read_s <= 2
    assert 0 < timeout.connect_s <= 2


def test_priority_maps_to_each_brokers_order() -> None:
    assert [broker_priority(p, "redis://h/0") for p in (0, 5, 9)] == [9, 4, 0]
    assert [broker_priority(p, "amqp://guest@h//") for p in (0, 5, 9)] == [0, 5, 9]
    with pytest.raises(ValueError, match="priority"):
        broker_priority(10, "redis://h/0")
    assert app.conf.task_queue_max_priority == 9
    assert app.conf.broker_transport_options["priority_steps"] == list(range(10))


# --- the message path as functions ----------------------------------------------------


def _message(agent: str, **fields: Any) -> AiMessage:
    return AiMessage(agent_id=agent, prompt=fields.pop("prompt", f"resilience {uuid.uuid4()}"),
                     max_tokens=16, **fields)


def _policies(**config: Any) -> Policies:
    breaker = CircuitBreaker(BreakerConfig(**{"probe_ttl_s": 95.0, **config}))
    return Policies([BudgetAdmission(), breaker, RetryPolicy(LIMITS)])


def test_all_open_fails_fast_naming_every_endpoint(simulator: Sim,
                                                   endpoint: MakeEndpoint) -> None:
    sim = simulator()
    a, b = endpoint(sim, "a-open"), endpoint(sim, "b-open", price_in="0.002")
    now = time.time()
    _open(a.id, now, 50)
    _open(b.id, now, 20)
    message = _message(new_agent("all-open"))
    outcome = routing.route(app, message, policies=_policies(all_open="fail"))
    assert isinstance(outcome, Refused) and isinstance(outcome.error, NoEndpointAvailable)
    assert {eid: why.split(":")[0] for eid, why in outcome.error.excluded.items()} == {
        a.id: "breaker_open", b.id: "breaker_open"}
    assert a.id in outcome.error.message and b.id in outcome.error.message
    [decision] = decisions_for(message.id)
    assert decision["winner"] is None and set(decision["excluded"]) == {a.id, b.id}
    assert sim.stats()["calls"] == 0


def test_all_open_soonest_sends_to_the_first_cooldown_to_end_which_waits_for_it(
    simulator: Sim, endpoint: MakeEndpoint
) -> None:
    sim = simulator()
    a, b = endpoint(sim, "a-open"), endpoint(sim, "b-open", price_in="0.002")
    now = time.time()
    _open(a.id, now, 50)
    _open(b.id, now, 20)
    soonest = _policies(all_open="soonest")
    message = _message(new_agent("soonest"))
    outcome = routing.route(app, message, policies=soonest)
    assert isinstance(outcome, HandOff)
    assert [e["id"] for e in outcome.envelope.route] == [b.id]
    [decision] = decisions_for(message.id)
    assert decision["winner"] == b.id and decision["excluded"][a.id].startswith("breaker_open")
    waited = calling.call(app, outcome.envelope, wait_s=5, policies=soonest)
    assert isinstance(waited, Retry) and 15 < waited.countdown_s <= 20.1
    assert sim.stats()["calls"] == 0
    assert [r.state for r in _reservations(message.id)] == ["reserved"]  # kept for the call


def test_an_endpoint_whose_breaker_opened_after_routing_is_skipped_for_the_next(
    simulator: Sim, endpoint: MakeEndpoint
) -> None:
    a_sim, b_sim = simulator(), simulator()
    a, b = endpoint(a_sim, "a-shut"), endpoint(b_sim, "b-next", price_in="0.002")
    policies = _policies()
    message = _message(new_agent("skipped"))
    handed = routing.route(app, message, policies=policies)
    assert isinstance(handed, HandOff) and handed.envelope.route[0]["id"] == a.id
    _open(a.id, time.time(), 30)
    skipped = calling.call(app, handed.envelope, wait_s=5, policies=policies)
    assert isinstance(skipped, Fallback) and skipped.envelope.route[0]["id"] == b.id
    assert skipped.envelope.attempts[0]["error"]["reason"] == "breaker_open"
    assert [r.state for r in _reservations(message.id)] == ["released", "reserved"]
    done = calling.call(app, skipped.envelope, wait_s=5, policies=policies)
    assert isinstance(done, Done)
    assert [(x["endpoint_id"], x["ok"]) for x in done.result["attempts"]] == [
        (a.id, False), (b.id, True)]
    assert a_sim.stats()["calls"] == 0 and b_sim.stats()["calls"] == 1
    # A second delivery of the skipped call repeats the decision without calling.
    again = calling.call(app, handed.envelope, wait_s=5, policies=policies)
    assert isinstance(again, Fallback) and again.envelope.route == skipped.envelope.route


def test_a_throttled_call_is_retried_at_the_same_endpoint_as_a_new_reserved_call(
    simulator: Sim, endpoint: MakeEndpoint
) -> None:
    only = endpoint(simulator(throttle_rate=1.0, retry_after_s=1), "throttled")
    message = _message(new_agent("retried"))
    handed = routing.route(app, message, policies=_policies())
    assert isinstance(handed, HandOff)
    outcome = calling.call(app, handed.envelope, wait_s=5, policies=_policies())
    assert isinstance(outcome, Fallback) and outcome.countdown_s == 1.0
    nxt = outcome.envelope
    assert nxt.route[0]["id"] == only.id and nxt.attempt_no == 1
    assert nxt.attempts[0]["error"]["status"] == 429
    assert nxt.attempts[0]["error"]["retried_after_s"] == 1.0
    assert [r.call_key for r in _reservations(message.id)] == [
        keys.call_key(message.id, 0), keys.call_key(message.id, 1)]


def test_a_retry_that_cannot_finish_before_the_deadline_is_not_started(
    simulator: Sim, endpoint: MakeEndpoint
) -> None:
    sim = simulator(throttle_rate=1.0, retry_after_s=5)
    endpoint(sim, "late")
    message = _message(new_agent("too-late"), deadline=utcnow() + timedelta(seconds=3))
    handed = routing.route(app, message, policies=_policies())
    assert isinstance(handed, HandOff)
    outcome = calling.call(app, handed.envelope, wait_s=5, policies=_policies())
    assert isinstance(outcome, Failed) and isinstance(outcome.error, ProviderError)
    assert outcome.error.status == 429 and outcome.error.retry_after_s == 5
    assert sim.stats()["calls"] == 1


def test_the_cli_and_the_exporter_show_breaker_state(simulator: Sim,
                                                     endpoint: MakeEndpoint) -> None:
    from aimesh_tasks.cli.main import cli

    sim = simulator()
    shut, fine = endpoint(sim, "a-shut"), endpoint(sim, "b-fine")
    _open(shut.id, time.time(), 60)
    listed = CliRunner().invoke(cli, ["endpoints", "list", "--json"])
    assert listed.exit_code == 0, listed.output
    rows = {row["id"]: row for row in map(json.loads, listed.output.splitlines())}
    assert (rows[shut.id]["breaker"], rows[fine.id]["breaker"]) == ("open", "closed")
    table = CliRunner().invoke(cli, ["endpoints", "list"], env={"COLUMNS": "250"})
    assert "breaker" in table.output and "open" in table.output
    broker = redis.Redis.from_url(f"{REDIS}/{BROKER_DB}")
    [family] = [f for f in ClusterCollector(broker).collect() if f.name == "aimesh_breaker_state"]
    values = {(s.labels["endpoint"], s.labels["state"]): s.value for s in family.samples}
    assert values[(shut.id, "open")] == 1 and values[(shut.id, "closed")] == 0
    assert values[(fine.id, "closed")] == 1


# --- end to end, through the worker processes -----------------------------------------


def _stamped(sim: RunningSimulator, relay: MakeRelay, **options: Any) -> Relay:
    """A relay that lets the simulator answer its first call as scripted, then answer
    every later call (the retry) with 200."""
    return relay(sim, on_answer=lambda n, _status: sim.configure(throttle_rate=0.0)
                 if n == 1 else None, **options)


@pytest.mark.usefixtures("workers")
def test_429_with_retry_after_one_second_retries_the_same_endpoint_after_it(
    simulator: Sim, endpoint: MakeEndpoint, relay: MakeRelay
) -> None:
    sim = simulator(throttle_rate=1.0, retry_after_s=1)
    stamps = _stamped(sim, relay)
    only = endpoint(stamps, "retry-after")
    agent = new_agent("retry-after")
    result = submit(agent_id=agent, prompt="retry me", max_tokens=16).get(timeout=60)
    assert [(a["endpoint_id"], a["ok"]) for a in result["attempts"]] == [
        (only.id, False), (only.id, True)]
    first_error = result["attempts"][0]["error"]
    assert first_error["status"] == 429 and first_error["retry_after_s"] == 1
    assert 1.0 <= first_error["retried_after_s"] <= get_settings().retry_max_delay_s
    first, second = stamps.arrivals()
    assert (first.call_key, second.call_key) == (f"{result['message_id']}:0",
                                                 f"{result['message_id']}:1")
    assert first.answered_at is not None and second.arrived_at - first.answered_at >= 1.0
    ledger = _ledger(result["message_id"])
    assert [(row.call_key.rsplit(":", 1)[1], row.nusd > 0) for row in ledger] == [
        ("0", False), ("1", True)]
    assert Decimal(result["charged_usd"]) == Decimal(result["cost_usd"]) > 0


@pytest.mark.usefixtures("workers")
def test_retry_after_as_an_http_date_is_honoured_through_a_countdown(
    simulator: Sim, endpoint: MakeEndpoint, relay: MakeRelay
) -> None:
    sim = simulator(throttle_rate=1.0, retry_after_s=3)
    stamps = _stamped(sim, relay, retry_after_as_date=True)
    only = endpoint(stamps, "retry-date")
    result = submit(agent_id=new_agent("retry-date", None), prompt="a date", max_tokens=16
                    ).get(timeout=60)
    assert [(a["endpoint_id"], a["ok"]) for a in result["attempts"]] == [
        (only.id, False), (only.id, True)]
    [date] = stamps.dates
    first, second = stamps.arrivals()
    assert first.retry_after is not None and "GMT" in first.retry_after
    assert second.arrived_at >= date  # not before the instant the provider named
    assert result["attempts"][0]["error"]["retried_after_s"] > get_settings().retry_sleep_max_s


@pytest.mark.usefixtures("workers")
def test_retries_exhaust_then_fall_back_then_one_error_lists_every_attempt(
    simulator: Sim, endpoint: MakeEndpoint
) -> None:
    throttled_sim, broken_sim = simulator(throttle_rate=1.0, retry_after_s=0), simulator(
        error_rate=1.0)
    throttled = endpoint(throttled_sim, "a-throttled", price_in="0.001")
    broken = endpoint(broken_sim, "b-broken", price_in="0.002")
    agent = new_agent("exhausted")
    pending = submit(agent_id=agent, prompt="exhaust me", max_tokens=16)
    with pytest.raises(AllEndpointsFailed) as caught:
        pending.get(timeout=60)
    error = caught.value
    tried = [(a["endpoint_id"], a["error"]["status"]) for a in error.fields["attempts"]]
    retries = get_settings().retry_max_attempts
    assert tried == [(throttled.id, 429)] * (retries + 1) + [(broken.id, 500)]
    assert f"{retries + 2} calls at 2 endpoint(s)" in error.message
    assert f"{throttled.id} HTTP 429 rate_limited" in error.message
    assert f"{broken.id} HTTP 500 server_error" in error.message
    assert throttled_sim.stats()["throttled_429"] == retries + 1
    assert broken_sim.stats()["errors_500"] == 1
    ledger = _ledger(pending.id)
    assert [row.call_key for row in ledger] == [keys.call_key(pending.id, n)
                                                for n in range(retries + 2)]


def _ask(agent: str, prompt: str) -> dict[str, Any]:
    result: dict[str, Any] = submit(agent_id=agent, prompt=prompt, max_tokens=16
                                    ).get(timeout=60)
    return result


@pytest.mark.usefixtures("workers")
def test_one_breaker_for_every_worker_opens_half_opens_and_reopens_longer(
    simulator: Sim, endpoint: MakeEndpoint
) -> None:
    flaky_sim, good_sim = simulator(error_rate=1.0), simulator()
    flaky = endpoint(flaky_sim, "a-flaky", price_in="0.0001", price_out="0.0001")
    good = endpoint(good_sim, "b-good")
    agent = new_agent("breaker", None)
    limit = get_settings().breaker_failures
    # Failures recorded by the endpoint worker's processes open it ...
    for n in range(limit):
        result = _ask(agent, f"flaky {n}")
        assert [a["endpoint_id"] for a in result["attempts"]] == [flaky.id, good.id]
    state = read_states([flaky.id], time.time())[flaky.id]
    assert (state.state, state.cooldown_s) == ("open", get_settings().breaker_cooldown_s)
    # ... and the router worker's process leaves it out.
    result = _ask(agent, "after opening")
    assert [a["endpoint_id"] for a in result["attempts"]] == [good.id]
    [decision] = decisions_for(result["message_id"])
    assert decision["excluded"][flaky.id].startswith("breaker_open")
    assert flaky_sim.stats()["calls"] == limit
    # The cooldown passes: one probe, it fails, the breaker reopens for twice as long.
    _cooldown_over(flaky.id)
    reset_figures(flaky.id)  # the live health marked it down too; only the breaker counts
    result = _ask(agent, "probe that fails")
    assert [a["endpoint_id"] for a in result["attempts"]] == [flaky.id, good.id]
    state = read_states([flaky.id], time.time())[flaky.id]
    assert (state.state, state.cooldown_s) == ("open", 2 * get_settings().breaker_cooldown_s)
    # Passes again, the endpoint has recovered: the probe's success closes it.
    flaky_sim.configure(error_rate=0.0)
    _cooldown_over(flaky.id)
    reset_figures(flaky.id)
    result = _ask(agent, "probe that succeeds")
    assert [a["endpoint_id"] for a in result["attempts"]] == [flaky.id]
    assert read_states([flaky.id], time.time())[flaky.id].state == "closed"


@pytest.mark.usefixtures("workers")
def test_exactly_k_probes_cluster_wide_in_half_open_under_concurrent_load(
    simulator: Sim, endpoint: MakeEndpoint, relay: MakeRelay
) -> None:
    held = relay(simulator(), hold=True)
    shaky = endpoint(held, "a-shaky", price_in="0.0001", price_out="0.0001")
    good = endpoint(simulator(), "b-good")
    _open(shaky.id, time.time(), 30)
    _cooldown_over(shaky.id)
    agent = new_agent("probes", None)
    pending = [submit(agent_id=agent, prompt=f"concurrent {n}", max_tokens=16)
               for n in range(6)]
    held.wait_arrivals(1)
    probes = get_settings().breaker_probes

    def answered() -> list[AsyncResult] | None:
        ready = [p for p in pending if p.ready()]
        return ready if len(ready) == len(pending) - probes else None

    others = wait_until(answered, f"{len(pending) - probes} messages answered elsewhere")
    assert len(held.arrivals()) == probes  # exactly K calls reached the half-open endpoint
    assert all(p.get(timeout=5)["endpoint_id"] == good.id for p in others)
    held.release_all()
    [probe] = [p for p in pending if p not in others]
    assert probe.get(timeout=60)["endpoint_id"] == shaky.id
    assert read_states([shaky.id], time.time())[shaky.id].state == "closed"


@pytest.mark.usefixtures("workers")
def test_a_deadline_shorter_than_the_provider_is_deadline_exceeded_at_the_producer(
    simulator: Sim, endpoint: MakeEndpoint
) -> None:
    sim = simulator(latency_ms=60_000)
    endpoint(sim, "slow")
    agent = new_agent("deadline")
    pending = submit(agent_id=agent, prompt="too slow", max_tokens=16,
                     deadline=utcnow() + timedelta(seconds=4))
    # The provider would answer after 60 s and the plain timeout is 30 s: only a call
    # timeout cut at the deadline answers within this bound.
    with pytest.raises(DeadlineExceeded) as caught:
        pending.get(timeout=25)
    assert caught.value.fields["message_id"] == pending.id
    assert sim.stats()["calls"] == 1
    held = _reservations(pending.id)
    assert [r.state for r in held] == ["settled"]
    assert all(row.nusd <= held[0].nusd for row in _ledger(pending.id))  # at most what was called


def _redis_depth(queue: str) -> int:
    return queue_depths(redis.Redis.from_url(f"{REDIS}/{BROKER_DB}"), [queue])[queue]


def _overtaking(held: Relay, queue: str, send: Callable[[str, int], AsyncResult],
                depth: Callable[[str], int]) -> None:
    """Block the endpoint worker's 3 processes at the relay, queue six priority-0
    messages and then three priority-9 ones, and let one answer through at a time: each
    frees one process, which takes one message. The three priority-9 ones must be the
    next three calls."""
    slots = 3  # the endpoint worker's processes
    blockers = [send(f"blocker {n}", 5) for n in range(slots)]
    held.wait_arrivals(slots)
    low = [send(f"low {n}", 0) for n in range(6)]
    wait_until(lambda: depth(queue) == len(low), "the priority-0 backlog queued",
               seen=lambda: depth(queue))
    high = [send(f"high {n}", 9) for n in range(3)]
    wait_until(lambda: depth(queue) == len(low) + len(high), "priority 9 queued",
               seen=lambda: depth(queue))
    for n in range(len(low) + len(high)):
        held.release(1)
        held.wait_arrivals(slots + n + 1)
    order = [(a.call_key or "").rsplit(":", 1)[0] for a in held.arrivals()[slots:]]
    assert set(order[:len(high)]) == {p.id for p in high}, order
    assert set(order[len(high):]) == {p.id for p in low}
    held.release_all()
    for each in blockers + low + high:
        assert each.get(timeout=60)["text"]


@pytest.mark.usefixtures("workers")
def test_priority_nine_messages_overtake_a_backlog_of_priority_zero_on_redis(
    simulator: Sim, endpoint: MakeEndpoint, relay: MakeRelay
) -> None:
    held = relay(simulator(), hold=True)
    only = endpoint(held, "prio")
    agent = new_agent("prio", None)

    def send(prompt: str, priority: int) -> AsyncResult:
        return submit(agent_id=agent, prompt=prompt, max_tokens=16, priority=priority)

    _overtaking(held, only.queue, send, _redis_depth)


RABBIT = f"amqp://guest:guest@127.0.0.1:5672/aimesh_test_{SLOT}"


def _rabbitmqctl(*args: str) -> None:
    done = subprocess.run(["rabbitmqctl", *args], capture_output=True, text=True, timeout=120)
    if done.returncode != 0 and "already_exists" not in done.stdout + done.stderr:
        pytest.fail(f"rabbitmqctl {' '.join(args)} failed: {done.stderr[-500:]}. RabbitMQ "
                    "must run at 127.0.0.1:5672 (e.g. `rabbitmq-server -detached`)")


@pytest.fixture(scope="module")
def rabbit_workers(database: str) -> Iterator[list[WorkerProcess]]:
    """A router and an endpoint worker on RabbitMQ (their own vhost, emptied first);
    results in this slot's Redis as for every other test."""
    if shutil.which("rabbitmqctl") is None:
        pytest.fail("rabbitmqctl is not installed: the RabbitMQ priority test needs "
                    "RabbitMQ at 127.0.0.1:5672")
    vhost = RABBIT.rsplit("/", 1)[1]
    subprocess.run(["rabbitmqctl", "delete_vhost", vhost], capture_output=True, timeout=120)
    _rabbitmqctl("add_vhost", vhost)
    _rabbitmqctl("set_permissions", "-p", vhost, "guest", ".*", ".*", ".*")
    # Priorities need classic queues on RabbitMQ 3.x (aimesh_tasks/rabbit/queues.py).
    env = {"AIMESH_BROKER_URL": RABBIT, "AIMESH_RABBIT_QUEUE_TYPE": "classic"}
    started = [WorkerProcess(f"rabbit-router-{uuid.uuid4().hex[:6]}",
                             ["--router", "-P", "prefork", "-c", "2"], env),
               WorkerProcess(f"rabbit-endpoints-{uuid.uuid4().hex[:6]}",
                             ["--endpoints", "all", "-P", "prefork", "-c", "3"], env)]
    try:
        for worker in started:  # control commands would go through this test's Redis app
            wait_until(lambda w=worker: f"{w.hostname} ready." in w.log.read_text(),
                       f"worker {worker.name} ready on RabbitMQ", 60,
                       seen=lambda w=worker: w.log.read_text()[-2000:])
        yield started
    finally:
        for worker in started:
            worker.stop()


@pytest.mark.slow
def test_priority_nine_messages_overtake_a_backlog_of_priority_zero_on_rabbitmq(
    rabbit_workers: list[WorkerProcess], simulator: Sim, endpoint: MakeEndpoint,
    relay: MakeRelay
) -> None:
    held = relay(simulator(), hold=True)
    only = endpoint(held, "prio-rabbit")
    agent = new_agent("prio-rabbit", None)
    with Connection(RABBIT) as connection:
        producer = connection.Producer()

        def send(prompt: str, priority: int) -> AsyncResult:
            message = _message(agent, prompt=prompt, priority=priority)
            return route_message.apply_async(
                (message.to_json_dict(),), producer=producer,
                priority=broker_priority(priority, RABBIT))

        def depth(queue: str) -> int:
            with Connection(RABBIT) as probe:
                return int(probe.default_channel.queue_declare(queue, passive=True)
                           .message_count)

        wait_until(lambda: _declared(RABBIT, only.queue), "the endpoint queue declared by "
                   "the endpoint worker following the registry")
        _overtaking(held, only.queue, send, depth)


def _declared(url: str, queue: str) -> bool:
    try:
        with Connection(url) as probe:
            probe.default_channel.queue_declare(queue, passive=True)
        return True
    except Exception:  # NOT_FOUND closes the channel: not declared yet
        return False
