"""Governance on the message path: routes and their ACLs, intent routing that says
"ambiguous", rate limits shared by every worker, loop caps.

Each rule is a policy inside the routing task, so the tests that must show it holds for
every door run through real workers (submit() and a task pushed straight onto the route
queue); the rest call `pipeline.routing.route` as a plain function on real Redis, Postgres
and the MiniLM model. Rate-limit windows move by an injected clock, never by sleeping.
"""

from __future__ import annotations

import itertools
import json
import os
import statistics
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml
from sqlalchemy import select, text
from typer.testing import CliRunner

from aimesh_tasks import Step, Workflow, keys, outbox, redis_batch, submit, submit_workflow
from aimesh_tasks.api_keys import create_key
from aimesh_tasks.app import app
from aimesh_tasks.budgets import set_budget
from aimesh_tasks.cli.main import cli
from aimesh_tasks.db import AgentRow, AuditRow, LedgerRow, ReservationRow, session_scope
from aimesh_tasks.delivery import accepted, dead_letters
from aimesh_tasks.errors import (
    Ambiguous,
    Forbidden,
    InvalidInput,
    InvalidMessage,
    LoopCapExceeded,
    NoEndpointAvailable,
    NoRouteMatches,
    RateLimited,
    Unauthorized,
)
from aimesh_tasks.governance import add_agent
from aimesh_tasks.governance.acl import ANONYMOUS, RouteAcl
from aimesh_tasks.governance.intents import INDEX, pick
from aimesh_tasks.governance.limits import RateLimit, set_rate_limit
from aimesh_tasks.governance.loop_cap import LoopCap
from aimesh_tasks.governance.rate_limit import RateLimits, admission_tokens, usage
from aimesh_tasks.governance.route_policy import RouteSelection
from aimesh_tasks.governance.routes import list_routes
from aimesh_tasks.governance.spec_file import apply_spec, parse_spec
from aimesh_tasks.governance.table import TABLE, load_table
from aimesh_tasks.governance.version import bump_version
from aimesh_tasks.keys import ROUTE_QUEUE
from aimesh_tasks.messages import AiMessage, parse_message
from aimesh_tasks.pipeline import calling, routing
from aimesh_tasks.pipeline.outcomes import Done, HandOff, Hit, Refused, Requeue
from aimesh_tasks.policies import Policies, active
from aimesh_tasks.policies.budget import BudgetAdmission
from aimesh_tasks.redis_client import get_redis
from aimesh_tasks.registry import Endpoint
from aimesh_tasks.settings import get_settings, reset_settings

pytestmark = pytest.mark.usefixtures("clean")
LABELLED = Path(__file__).parent / "data" / "intents_labelled.yaml"
Sim = Callable[..., Any]
MakeEndpoint = Callable[..., Endpoint]


class Clock:
    """An injected clock for rate-limit windows (epoch seconds)."""

    def __init__(self) -> None:
        self.now = 1_900_000_000.0

    def __call__(self) -> float:
        return self.now


def _governed(clock: Clock | None = None) -> Policies:
    return Policies([LoopCap(), RouteSelection(), RouteAcl(), RateLimits(clock),
                     BudgetAdmission()])


def _message(agent: str = "gov-agent", prompt: str = "hello there", route: str | None = None,
             **fields: Any) -> AiMessage:
    metadata = dict(fields.pop("metadata", {}))
    if route is not None:
        metadata["aimesh.route"] = route
    fields.setdefault("max_tokens", 16)
    return AiMessage(agent_id=agent, prompt=prompt, metadata=metadata, **fields)


def _route(message: AiMessage, policies: Policies | None = None) -> Any:
    return routing.route(app, message, policies=policies or _governed())


def _audit(message_id: str) -> list[tuple[str, dict[str, Any]]]:
    outbox.flush(wait_s=5)
    with session_scope() as session:
        rows = session.scalars(select(AuditRow).where(AuditRow.message_id == message_id)
                               .order_by(AuditRow.id))
        return [(r.event, r.detail) for r in rows]


def _first_checked_ms(message_id: str) -> float:
    """When routing first looked at a message: its `queued` audit row if it waited, else
    its `routed` row (each written at the check, by the router's clock)."""
    with session_scope() as session:
        rows = session.scalars(select(AuditRow).where(
            AuditRow.message_id == message_id, AuditRow.event.in_(("queued", "routed"))))
        return min(r.created_at.timestamp() * 1000 for r in rows)


def _route_spec(name: str, target: dict[str, Any], **fields: Any) -> dict[str, Any]:
    return {"name": name, "target": target, **fields}


@pytest.fixture()
def sim(simulator: Sim) -> Any:
    return simulator(completion_tokens=7)


# --- routes: files, validation, CLI -----------------------------------------------------


def test_an_invalid_routes_file_is_refused_whole_naming_route_and_field() -> None:
    good = _route_spec("good-route", {"tags": ["x"]})
    with pytest.raises(InvalidInput) as caught:
        apply_spec({"routes": [good, _route_spec("billing", {"tags": ["a"], "model": "m"})]})
    assert caught.value.field.startswith("routes.billing.target")
    assert "exactly one of" in caught.value.message
    with pytest.raises(InvalidInput, match=r"routes\.billing\.fallback: route 'nowhere'"):
        apply_spec({"routes": [good, _route_spec("billing", {"tags": ["a"]},
                                                 fallback="nowhere")]})
    with pytest.raises(InvalidInput, match=r"routes\.billing\.allowed"):
        apply_spec({"routes": [_route_spec("billing", {"tags": ["a"]}, allowed=["Not OK"])]})
    with pytest.raises(InvalidInput, match=r"rate_limits\.ghost: agent 'ghost' is not "):
        apply_spec({"routes": [good], "rate_limits": {"ghost": {"requests_per_minute": 5}}})
    assert list_routes() == []  # nothing of any refused file was applied


def test_cli_applies_lists_shows_and_removes_routes(tmp_path: Path) -> None:
    add_agent("cli-bot")
    path = tmp_path / "routes.yaml"
    path.write_text(yaml.safe_dump({
        "routes": [_route_spec("general", {"model": "sim-model"}),
                   _route_spec("billing", {"tags": ["billing"]}, allowed=["cli-bot"],
                               intents=["refund my invoice"], fallback="general")],
        "rate_limits": {"cli-bot": {"requests_per_minute": 10}}}))
    runner = CliRunner()
    applied = runner.invoke(cli, ["routes", "apply", str(path)])
    assert applied.exit_code == 0, applied.output
    assert "applied 2 route(s)" in applied.output
    listed = runner.invoke(cli, ["routes", "list", "--json"])
    assert [line.count('"name"') for line in listed.output.splitlines()] == [1, 1]
    shown = runner.invoke(cli, ["routes", "show", "billing"])
    assert '"allowed": [\n    "cli-bot"\n  ]' in shown.output
    assert '"rate_limits"' not in shown.output
    limits = runner.invoke(cli, ["routes", "limits", "--json"])
    assert '"requests_per_minute": 10' in limits.output
    refused = runner.invoke(cli, ["routes", "remove", "general"])
    assert refused.exit_code == 2 and "billing fall back to it" in refused.output
    assert runner.invoke(cli, ["routes", "remove", "billing"]).exit_code == 0
    assert [r.name for r in list_routes()] == ["general"]
    bad = tmp_path / "bad.json"
    bad.write_text('{"routes": [{"name": "x", "target": {}}]}')
    failed = runner.invoke(cli, ["routes", "apply", str(bad)])
    assert failed.exit_code == 2 and "routes.x.target" in failed.output


def test_governance_errors_carry_their_http_status() -> None:
    assert {cls.__name__: cls.http_status for cls in (
        Unauthorized, Forbidden, Ambiguous, NoRouteMatches, RateLimited, LoopCapExceeded)} == {
        "Unauthorized": 401, "Forbidden": 403, "Ambiguous": 409, "NoRouteMatches": 404,
        "RateLimited": 429, "LoopCapExceeded": 403}
    limited = RateLimited("over", retry_after_s=1.5, agent_id="a", limit="requests_per_minute")
    assert (limited.retry_after_s, limited.agent_id, limited.limit) == (
        1.5, "a", "requests_per_minute")


def test_the_message_path_registers_governance_before_the_budget() -> None:
    assert [p.name for p in active().policies][:6] == [
        "workflow_cancellation", "loop_cap", "routes", "acl", "rate_limits", "budget"]


# --- ACL ---------------------------------------------------------------------------------

ROUTES = ("open-route", "any-route", "listed-route")
AGENTS = ("listed-agent", "other-agent", "stranger", ANONYMOUS)
# route → agent → the refusal expected (None: the message is routed).
MATRIX: dict[str, dict[str, type[Exception] | None]] = {
    "open-route": dict.fromkeys(AGENTS),
    "any-route": {"listed-agent": None, "other-agent": None, "stranger": Unauthorized,
                  ANONYMOUS: Unauthorized},
    "listed-route": {"listed-agent": None, "other-agent": Forbidden, "stranger": Unauthorized,
                     ANONYMOUS: Unauthorized},
}


def _acl_routes(target: dict[str, Any]) -> None:
    add_agent("listed-agent")
    add_agent("other-agent")
    apply_spec({"routes": [_route_spec("open-route", target),
                           _route_spec("any-route", target, allowed="*"),
                           _route_spec("listed-route", target, allowed=["listed-agent"])]})


def test_acl_matrix_as_plain_functions(sim: Any, endpoint: MakeEndpoint) -> None:
    one = endpoint(sim, "acl-one")
    _acl_routes({"endpoints": [one.id]})
    for route, expected_by_agent in MATRIX.items():
        for agent, expected in expected_by_agent.items():
            message = _message(agent, f"acl {route} {agent}", route=route)
            outcome = _route(message)
            events = _audit(message.id)
            if expected is None:
                assert isinstance(outcome, HandOff), (route, agent, outcome)
                assert [e for e, _ in events] == ["route_matched", "routed"]
                continue
            assert isinstance(outcome, Refused) and type(outcome.error) is expected, (
                route, agent, outcome)
            # The route it resolved to, then denied once, before anything was reserved.
            assert [e for e, _ in events] == ["route_matched", "denied"]
            detail = events[1][1]
            assert detail["policy"] == "acl"
            assert detail["route"] == route and detail["rule"] in (
                "anonymous", "unregistered", "not_listed")


def test_a_disabled_agent_is_forbidden_and_a_new_agent_is_seen_at_once(
    sim: Any, endpoint: MakeEndpoint
) -> None:
    one = endpoint(sim, "acl-dis")
    _acl_routes({"endpoints": [one.id]})
    late = _message("late-agent", "late", route="any-route")
    assert isinstance(_route(late).error, Unauthorized)
    add_agent("late-agent")  # moves the governance version: the next message sees it
    assert isinstance(_route(_message("late-agent", "late 2", route="any-route")), HandOff)
    with session_scope() as session:
        row = session.get(AgentRow, "listed-agent")
        assert row is not None
        row.enabled = False
    bump_version()
    outcome = _route(_message("listed-agent", "disabled", route="listed-route"))
    assert isinstance(outcome.error, Forbidden) and outcome.error.rule == "disabled"


def test_routes_narrow_the_candidates_to_their_target(
    sim: Any, endpoint: MakeEndpoint
) -> None:
    billing = endpoint(sim, "t-billing", tags=["billing"], price_in="0.9", price_out="0.9")
    endpoint(sim, "t-cheap")  # cheaper, but not in the route's target
    apply_spec({"routes": [_route_spec("billing", {"tags": ["billing"]}),
                           _route_spec("empty", {"endpoints": ["no-such-endpoint"]})]})
    outcome = _route(_message(route="billing"))
    assert isinstance(outcome, HandOff) and [e["id"] for e in outcome.envelope.route] == [
        billing.id]
    empty = _route(_message(prompt="to nowhere", route="empty"))
    assert isinstance(empty.error, NoEndpointAvailable) and "route 'empty'" in str(empty.error)
    unknown = _route(_message(prompt="unknown", route="no-such-route"))
    assert isinstance(unknown.error, NoRouteMatches)


def test_without_routes_every_endpoint_serves_every_message(
    sim: Any, endpoint: MakeEndpoint
) -> None:
    one = endpoint(sim, "no-routes")
    message = _message(ANONYMOUS, "anyone")
    outcome = _route(message)
    assert isinstance(outcome, HandOff) and outcome.envelope.route[0]["id"] == one.id
    assert [e for e, _ in _audit(message.id)] == ["routed"]


@pytest.mark.usefixtures("workers")
def test_acl_matrix_through_workers_for_submit_and_a_task_pushed_onto_the_queue(
    sim: Any, endpoint: MakeEndpoint
) -> None:
    one = endpoint(sim, "acl-w")
    _acl_routes({"endpoints": [one.id]})
    passed: list[tuple[str, str, str]] = []
    pending = []
    for route, expected_by_agent in MATRIX.items():
        for agent, expected in expected_by_agent.items():
            for door in ("submit", "broker"):
                message = _message(agent, f"{door} {route} {agent}", route=route)
                result = (submit(message) if door == "submit" else app.send_task(
                    "aimesh.route", args=[message.to_json_dict()], task_id=message.id,
                    queue=ROUTE_QUEUE))
                pending.append((route, agent, door, expected, message.id, result))
    for route, agent, door, expected, message_id, result in pending:
        if expected is None:
            assert result.get(timeout=60)["endpoint_id"] == one.id
            passed.append((route, agent, door))
            continue
        with pytest.raises(expected):
            result.get(timeout=60)
        assert [e for e, _ in _audit(message_id)] == ["route_matched", "denied"], (
            route, agent, door)
    allowed = {(r, a) for r, by_agent in MATRIX.items() for a, e in by_agent.items() if not e}
    assert {(r, a) for r, a, _ in passed} == allowed  # 0 cross-agent passes
    assert len(passed) == 2 * len(allowed)
    with session_scope() as session:
        charged = {row.message_id for row in session.scalars(select(LedgerRow))}
        held = {row.message_id for row in session.scalars(select(ReservationRow))}
    denied = {p[4] for p in pending if p[3] is not None}
    assert not denied & (charged | held)


# --- intent routing --------------------------------------------------------------------


def _labelled() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load(LABELLED.read_text())
    return data


def _intent_endpoints(sim: Any, endpoint: MakeEndpoint) -> dict[str, str]:
    """One endpoint per route of the labelled set, tagged with the route's name."""
    spec = _labelled()
    apply_spec({"routes": spec["routes"]})
    return {r["name"]: endpoint(sim, f"i-{r['name']}", tags=[r["name"]]).id
            for r in spec["routes"]}


def test_intents_pick_the_route_and_record_every_score(
    sim: Any, endpoint: MakeEndpoint
) -> None:
    by_route = _intent_endpoints(sim, endpoint)
    clear = {"billing": "I was billed two times for the same order, please refund me",
             "weather": "Will I need an umbrella in London on Saturday?",
             "coding": "My Java program throws a NullPointerException on line 12"}
    for route, prompt in clear.items():
        message = _message(prompt=prompt)
        outcome = _route(message)
        assert isinstance(outcome, HandOff)
        assert [e["id"] for e in outcome.envelope.route] == [by_route[route]]
        matched = dict(_audit(message.id))["route_matched"]
        assert matched["route"] == route and matched["via"] == "intent"
        assert set(matched["scores"]) == set(by_route)
        assert max(matched["scores"], key=matched["scores"].get) == route


def test_a_prompt_between_two_routes_is_ambiguous_naming_both(
    sim: Any, endpoint: MakeEndpoint
) -> None:
    _intent_endpoints(sim, endpoint)
    message = _message(prompt="will the weather affect my invoice")
    outcome = _route(message)
    assert isinstance(outcome, Refused) and isinstance(outcome.error, Ambiguous)
    assert sorted(outcome.error.routes) == ["billing", "weather"]
    first, second = (outcome.error.scores[r] for r in outcome.error.routes)
    assert 0 <= first - second < 0.05
    [(event, detail)] = _audit(message.id)
    assert event == "denied" and detail["policy"] == "routes"
    assert detail["code"] == "ambiguous_route" and set(detail["scores"]) == {
        "billing", "weather"}


def test_below_min_score_goes_to_the_fallback_and_explicit_names_win(
    sim: Any, endpoint: MakeEndpoint
) -> None:
    by_route = _intent_endpoints(sim, endpoint)
    weak = _message(prompt="the mitochondria is the powerhouse of the cell")
    outcome = _route(weak)
    assert isinstance(outcome, HandOff) and outcome.envelope.route[0]["id"] == by_route[
        "general"]
    matched = dict(_audit(weak.id))["route_matched"]
    assert matched["via"] == "fallback" and max(matched["scores"].values()) < 0.40
    named = _route(_message(prompt="will the weather affect my invoice", route="coding"))
    assert isinstance(named, HandOff) and named.envelope.route[0]["id"] == by_route["coding"]
    nothing = _route(_message(prompt="How many legs does a spider have?"))
    assert isinstance(nothing.error, NoRouteMatches)  # closest is `general`: no fallback


def test_intent_accuracy_on_the_labelled_set() -> None:
    """Accuracy of the classifier (routes, fallbacks, no match, ambiguous) on a labelled
    set; the figure and the lookup p50 are printed for the record."""
    spec = _labelled()
    routes = {r.name: r for r in parse_spec({"routes": spec["routes"]}).routes}
    INDEX.scores("warm the model and the route embeddings", routes)
    right, took_ms = 0, []
    for case in spec["cases"]:
        started = time.perf_counter()
        scores = INDEX.scores(case["prompt"], routes)
        try:
            match = pick(scores, routes, min_score=0.40, ambiguity_threshold=0.05)
            got = "fallback" if match.via == "fallback" else match.route
        except Ambiguous:
            got = "ambiguous"
        except NoRouteMatches:
            got = "none"
        took_ms.append((time.perf_counter() - started) * 1000)
        right += got == case["expect"]
    accuracy = right / len(spec["cases"])
    print(f"intent accuracy {right}/{len(spec['cases'])} = {accuracy:.2f}, "
          f"lookup p50 {statistics.median(took_ms):.1f} ms")
    assert accuracy >= 0.9


def test_pick_is_pure_and_names_the_rule() -> None:
    routes = {r.name: r for r in parse_spec({"routes": [
        _route_spec("a", {"tags": ["a"]}, intents=["x"], fallback="b"),
        _route_spec("b", {"tags": ["b"]}, intents=["y"])]}).routes}
    assert pick({"a": 0.9, "b": 0.5}, routes, min_score=0.4,
                ambiguity_threshold=0.05).route == "a"
    with pytest.raises(Ambiguous):
        pick({"a": 0.6, "b": 0.58}, routes, min_score=0.4, ambiguity_threshold=0.05)
    assert pick({"a": 0.3, "b": 0.1}, routes, min_score=0.4,
                ambiguity_threshold=0.05).route == "b"
    with pytest.raises(NoRouteMatches, match="under the minimum"):
        pick({"a": 0.1, "b": 0.3}, routes, min_score=0.4, ambiguity_threshold=0.05)


# --- rate limits -------------------------------------------------------------------------


def test_requests_per_minute_in_a_moving_window_by_an_injected_clock(
    sim: Any, endpoint: MakeEndpoint
) -> None:
    endpoint(sim, "rl-one")
    add_agent("rl-agent")
    set_rate_limit(RateLimit("rl-agent", requests_per_minute=3))
    clock = Clock()
    policies = _governed(clock)
    first = _message("rl-agent", "one")
    for n, message in enumerate([first, _message("rl-agent", "two"),
                                 _message("rl-agent", "three")]):
        clock.now += n
        assert isinstance(_route(message, policies), HandOff)
    assert isinstance(_route(first, policies), HandOff)  # a redelivery is not counted again
    clock.now += 10  # 13 s after the first (admitted at +0, +1 and +3 s)
    fourth = _message("rl-agent", "four")
    outcome = _route(fourth, policies)
    assert isinstance(outcome, Refused) and isinstance(outcome.error, RateLimited)
    assert outcome.error.retry_after_s == pytest.approx(47.0)
    assert outcome.error.limit == "requests_per_minute"
    [(event, detail)] = _audit(fourth.id)
    assert event == "denied" and detail["policy"] == "rate_limits"
    assert detail["limit"] == "requests_per_minute" and detail["current"] == 3
    clock.now += 47  # the first message leaves the window
    assert isinstance(_route(fourth, policies), HandOff)
    assert usage("rl-agent", 60, clock.now)[0] == 3


def test_tokens_are_charged_at_admission_and_corrected_to_the_settled_usage(
    sim: Any, endpoint: MakeEndpoint
) -> None:
    endpoint(sim, "tpm-one")
    add_agent("tpm-agent")
    clock = Clock()
    policies = _governed(clock)
    message = _message("tpm-agent", "count my tokens")
    estimate = admission_tokens(message)
    set_rate_limit(RateLimit("tpm-agent", tokens_per_minute=2 * estimate + 5))
    handed = _route(message, policies)
    assert isinstance(handed, HandOff)
    assert usage("tpm-agent", 60) == (1, estimate)
    done = calling.call(app, handed.envelope, wait_s=5, policies=policies)
    assert isinstance(done, Done)
    settled = done.result["input_tokens"] + done.result["output_tokens"]
    assert 0 < settled < estimate
    assert usage("tpm-agent", 60) == (1, settled)
    hit = _route(_message("tpm-agent", "count my tokens"), policies)
    assert isinstance(hit, Hit)  # answered without a call: counted, at 0 tokens
    assert usage("tpm-agent", 60) == (2, settled)
    greedy = _message("tpm-agent", "x" * 40, max_tokens=10_000)
    refused = _route(greedy, policies)
    assert isinstance(refused.error, RateLimited) and refused.error.retry_after_s is None
    assert "estimate alone is over" in str(refused.error)


def test_a_limit_changed_since_the_batch_was_queued_is_applied_at_once(
    sim: Any, endpoint: MakeEndpoint
) -> None:
    endpoint(sim, "rl-change")
    add_agent("change-agent")
    policies = _governed(Clock())
    assert isinstance(_route(_message("change-agent", "before"), policies), HandOff)
    set_rate_limit(RateLimit("change-agent", requests_per_minute=1))
    # This process's table still says "no limit" when the batch is queued; the version
    # read in that batch moved, so the limit is applied to this very message.
    assert isinstance(_route(_message("change-agent", "after 1"), policies), HandOff)
    assert isinstance(_route(_message("change-agent", "after 2"), policies).error,
                      RateLimited)


@pytest.mark.usefixtures("workers")
def test_rate_limit_is_exact_across_the_router_worker_processes(
    sim: Any, endpoint: MakeEndpoint
) -> None:
    endpoint(sim, "rl-workers", capacity=50)
    add_agent("busy-agent")
    set_rate_limit(RateLimit("busy-agent", requests_per_day=5))  # a day: no clock to race
    results = [submit(agent_id="busy-agent", prompt=f"busy {n} {uuid.uuid4().hex}",
                      max_tokens=8) for n in range(12)]
    done, limited = 0, []
    for result in results:
        try:
            result.get(timeout=60)
            done += 1
        except RateLimited as exc:
            limited.append(exc)
    assert (done, len(limited)) == (5, 7)
    assert all(e.limit == "requests_per_day" and (e.retry_after_s or 0) > 0 for e in limited)
    assert usage("busy-agent", 86400)[0] == 5


def _queue_mode(agent: str, **counts: int) -> RateLimit:
    add_agent(agent)
    return set_rate_limit(RateLimit(agent, on_excess="queue", **counts))


def test_queue_mode_waits_for_the_next_free_slot_holding_nothing_meanwhile(
    sim: Any, endpoint: MakeEndpoint
) -> None:
    endpoint(sim, "rl-queue")
    _queue_mode("queue-agent", requests_per_minute=2)
    set_budget("queue-agent", usd="5")
    clock = Clock()
    policies = _governed(clock)
    assert isinstance(_route(_message("queue-agent", "one"), policies), HandOff)
    clock.now += 10
    assert isinstance(_route(_message("queue-agent", "two"), policies), HandOff)
    third = _message("queue-agent", "three")
    clock.now += 10
    waiting = _route(third, policies)
    assert isinstance(waiting, Requeue) and waiting.countdown_s == pytest.approx(40.0)
    again = _route(third, policies)  # arrived early (a countdown is not exact): waits on
    assert isinstance(again, Requeue) and again.countdown_s == pytest.approx(40.0)
    assert usage("queue-agent", 60, clock.now)[0] == 2  # the waiting one is not counted
    assert get_redis().get(keys.handoff(third.id)) is None  # neither handed off
    with session_scope() as session:  # nor holding a reservation
        assert session.scalar(select(ReservationRow).where(
            ReservationRow.message_id == third.id)) is None
    [(event, detail)] = _audit(third.id)
    assert event == "queued" and detail["policy"] == "rate_limits"
    assert detail["limit"] == "requests_per_minute" and detail["countdown_s"] == 40.0
    clock.now += 40  # the first message leaves the window; the second is still in it
    assert isinstance(_route(third, policies), HandOff)
    assert usage("queue-agent", 60, clock.now)[0] == 2
    routed = dict(_audit(third.id))["routed"]
    assert routed["rate_limits"]["admitted_at_ms"] == int(clock.now * 1000)


def test_queue_mode_waits_at_most_half_the_visibility_timeout_and_never_past_a_deadline(
    sim: Any, endpoint: MakeEndpoint
) -> None:
    endpoint(sim, "rl-day")
    _queue_mode("daily-agent", requests_per_day=1)
    policies = _governed(Clock())
    assert isinstance(_route(_message("daily-agent", "today"), policies), HandOff)
    capped = _route(_message("daily-agent", "tomorrow"), policies)
    assert isinstance(capped, Requeue)  # a day's wait, in steps the broker can hold
    assert capped.countdown_s == get_settings().visibility_timeout_s / 2
    hurried = _route(_message("daily-agent", "now or never",
                              deadline=datetime.now(UTC) + timedelta(hours=1)), policies)
    assert isinstance(hurried, Refused) and isinstance(hurried.error, RateLimited)
    assert hurried.error.limit == "requests_per_day"


@pytest.mark.usefixtures("workers")
def test_queue_mode_three_times_the_limit_at_once_all_complete_none_over_a_window(
    sim: Any, endpoint: MakeEndpoint
) -> None:
    endpoint(sim, "rl-burst", capacity=50)
    limit = 1  # per second: three messages sent back to back are over it
    _queue_mode("burst-agent", requests_per_second=limit)
    tag = uuid.uuid4().hex
    results = [submit(agent_id="burst-agent", prompt=f"burst {n} {tag}", max_tokens=8)
               for n in range(3 * limit)]
    answers = [r.get(timeout=120) for r in results]  # a RateLimited would raise here
    assert len({a["message_id"] for a in answers}) == 3 * limit
    records = {r.id: dict(_audit(r.id)) for r in results}
    admitted = sorted(rec["routed"]["rate_limits"]["admitted_at_ms"]
                      for rec in records.values())
    # The limiter's own clock: in any moving second, at most `limit` admissions.
    assert all(sum(1 for t in admitted if start <= t < start + 1000) <= limit
               for start in admitted), admitted
    assert all("denied" not in rec for rec in records.values())
    # What waited says why. Whether one had to wait depends on how fast the router took
    # them, not on the limiter: so read when each was first checked (its `queued` row, else
    # its `routed` row: audited at the check) and ask for a wait only when two were checked
    # within one window, as they are unless the router takes over a second per message.
    queued = [rec["queued"] for rec in records.values() if "queued" in rec]
    assert all(q["limit"] == "requests_per_second" for q in queued), records
    checked = sorted(_first_checked_ms(r.id) for r in results)
    crowded = any(later - earlier < 1000
                  for earlier, later in itertools.pairwise(checked))
    assert queued or not crowded, (checked, records)


def test_a_keys_limit_is_independent_of_its_agents(sim: Any, endpoint: MakeEndpoint) -> None:
    endpoint(sim, "rl-keys")
    add_agent("keyed-agent")
    set_rate_limit(RateLimit("keyed-agent", requests_per_minute=5))
    two_a_minute = RateLimit("", requests_per_minute=2)
    first = create_key("keyed-agent", limits=two_a_minute).info.prefix
    second = create_key("keyed-agent", limits=two_a_minute).info.prefix
    policies = _governed(Clock())

    def send(key: str | None, text: str) -> Any:
        metadata = {"aimesh.api_key": key} if key else {}
        return _route(_message("keyed-agent", text, metadata=metadata), policies)

    assert all(isinstance(send(first, f"first {n}"), HandOff) for n in range(2))
    over_key = send(first, "first 3")
    assert isinstance(over_key, Refused) and isinstance(over_key.error, RateLimited)
    assert over_key.error.fields["api_key"] == first and first in str(over_key.error)
    # The other key of the same agent still has its own two.
    assert all(isinstance(send(second, f"second {n}"), HandOff) for n in range(2))
    assert isinstance(send(second, "second 3").error, RateLimited)
    assert usage("keyed-agent", 60, api_key=first)[0] == 2
    assert usage("keyed-agent", 60, api_key=second)[0] == 2
    # Both keys' messages count against the agent's own limit too (4 of 5 now).
    assert isinstance(send(None, "no key"), HandOff)
    over_agent = send(None, "no key 2")
    assert isinstance(over_agent.error, RateLimited)
    assert over_agent.error.fields["api_key"] is None and "agent 'keyed-agent'" in str(
        over_agent.error)
    assert usage("keyed-agent", 60)[0] == 5


def test_api_key_metadata_must_be_a_key_prefix() -> None:
    with pytest.raises(InvalidMessage, match="'aimesh.api_key' must be an API key's prefix"):
        parse_message({"agent_id": "a", "prompt": "p",
                       "metadata": {"aimesh.api_key": "amk_not-hex"}})
    good = parse_message({"agent_id": "a", "prompt": "p",
                          "metadata": {"aimesh.api_key": "amk_0123456789ab"}})
    assert good.metadata["aimesh.api_key"] == "amk_0123456789ab"


def test_keys_cli_sets_shows_and_clears_a_keys_limits(clean: None) -> None:
    runner = CliRunner()
    made = runner.invoke(cli, ["keys", "create", "--agent", "cli-keyed", "--rpm", "3",
                               "--tpm", "900", "--on-excess", "queue", "--json"])
    assert made.exit_code == 0, made.output
    created = json.loads(made.stdout)
    assert created["limits"] == {"requests_per_minute": 3, "tokens_per_minute": 900,
                                 "on_excess": "queue"}
    prefix = created["prefix"]
    changed = runner.invoke(cli, ["keys", "set-limits", prefix, "--rps", "1"])
    assert changed.exit_code == 0 and "r/second=1 refuse" in changed.output
    TABLE.clear()
    assert TABLE.current().key_limits[prefix].requests_per_second == 1
    listed = runner.invoke(cli, ["keys", "list"])
    assert "r/second=1" in listed.output
    cleared = runner.invoke(cli, ["keys", "set-limits", prefix, "--clear"])
    assert cleared.exit_code == 0 and ": -" in cleared.output
    assert prefix not in load_table(None).key_limits
    bad = runner.invoke(cli, ["keys", "set-limits", prefix, "--rpm", "2", "--on-excess",
                              "maybe"])
    assert bad.exit_code != 0 and "--on-excess" in bad.output
    neither = runner.invoke(cli, ["keys", "set-limits", prefix])
    assert neither.exit_code != 0 and "--clear" in neither.output


def test_a_routing_task_seen_again_is_not_taken_for_lost(clean: None) -> None:
    message = _message("seen-agent", "waits a while")
    assert accepted.record(message)
    redis_batch.send(lambda batch: accepted.queue_seen(batch, message.id))
    accepted.apply_marks()
    with session_scope() as session:
        session.execute(text("UPDATE accepted_messages SET updated_at = now() - interval "
                             "'1 hour' WHERE message_id = :m"), {"m": message.id})
    assert [q.message_id for q in accepted.quiet(600, 600, 10)] == [message.id]
    # its routing task started again after a wait
    redis_batch.send(lambda batch: accepted.queue_seen(batch, message.id))
    accepted.apply_marks()
    assert accepted.quiet(600, 600, 10) == []



def test_an_accepted_message_is_recorded_whole_once_and_not_at_all_without_postgres(
        clean: None) -> None:
    """The record is the message's only copy once a broker lost it: stored whole (what the
    reconciler publishes again), a second record of its id inserts nothing, and a database
    that cannot be reached leaves it unrecorded, never an error for the producer."""
    message = _message("recorded-agent", "kept whole")
    assert accepted.record(message)
    assert not accepted.record(message)
    with session_scope() as session:
        row = session.execute(text("SELECT state, message, accepted_at FROM accepted_messages "
                                   "WHERE message_id = :m"), {"m": message.id}).one()
    assert row.state == "accepted" and row.message == message.to_json_dict()
    assert row.accepted_at.tzinfo is not None
    reachable = os.environ["AIMESH_DATABASE_URL"]
    os.environ["AIMESH_DATABASE_URL"] = "postgresql://nobody@127.0.0.1:1/none"
    reset_settings()
    try:
        assert accepted.record(_message("recorded-agent", "no database")) is False
    finally:  # back before the fixtures' teardown empties the tables
        os.environ["AIMESH_DATABASE_URL"] = reachable
        reset_settings()

# --- loop caps ---------------------------------------------------------------------------


@pytest.fixture()
def max_hops(monkeypatch: pytest.MonkeyPatch) -> Iterator[int]:
    monkeypatch.setenv("AIMESH_MAX_HOPS", "2")
    reset_settings()
    yield 2
    monkeypatch.undo()
    reset_settings()


def test_hops_come_from_the_parent_and_past_the_cap_are_refused_once(
    sim: Any, endpoint: MakeEndpoint, max_hops: int
) -> None:
    endpoint(sim, "loop-one")
    parent = _message("ping", "origin")
    assert isinstance(_route(parent), HandOff)
    chain = [parent]
    for n in range(max_hops):
        child = _message("pong" if n % 2 == 0 else "ping", f"hop {n + 1}",
                         metadata={"aimesh.parent_id": chain[-1].id})
        assert isinstance(_route(child), HandOff)
        chain.append(child)
    over = _message("ping", "one hop too many", metadata={"aimesh.parent_id": chain[-1].id})
    first, again = _route(over), _route(over)  # a redelivery refuses it the same way
    assert isinstance(first.error, LoopCapExceeded) and first.error.hops == max_hops + 1
    assert isinstance(again.error, LoopCapExceeded)
    [entry] = [e for e in dead_letters.list_entries(ROUTE_QUEUE) if e["task_id"] == over.id]
    assert entry["reason"] == "loop_cap" and first.error.fields["dead_letter_id"] == entry["id"]
    assert [e for e, _ in _audit(over.id)] == ["denied"]
    assert get_redis().get(keys.hops(chain[-1].id)) == str(max_hops)


def test_hops_carried_from_outside_are_checked_at_the_edge(max_hops: int) -> None:
    with pytest.raises(InvalidMessage, match="past the cap of 2"):
        parse_message({"agent_id": "a", "prompt": "p", "metadata": {"aimesh.hops": 3}})
    with pytest.raises(InvalidMessage, match="whole number"):
        parse_message({"agent_id": "a", "prompt": "p", "metadata": {"aimesh.hops": "1"}})
    with pytest.raises(InvalidMessage, match="route name"):
        parse_message({"agent_id": "a", "prompt": "p", "metadata": {"aimesh.route": "Bad!"}})
    # Inside a task the cap is not checked again (it may have changed since acceptance).
    assert AiMessage.decode({"agent_id": "a", "prompt": "p",
                             "metadata": {"aimesh.hops": 9}}).metadata["aimesh.hops"] == 9


@pytest.mark.usefixtures("workers")
def test_a_ping_pong_between_two_agents_stops_at_the_hop_cap(
    sim: Any, endpoint: MakeEndpoint
) -> None:
    endpoint(sim, "ping-pong")
    for agent in ("ping", "pong"):
        add_agent(agent)
        set_budget(agent, usd="10")
    cap = 8  # the workers' AIMESH_MAX_HOPS (the default)
    text, parent, sent = "serve", None, []
    for hop in range(cap + 5):
        metadata = {"aimesh.parent_id": parent} if parent else {}
        result = submit(agent_id=("ping", "pong")[hop % 2], prompt=f"{hop}: {text}",
                        max_tokens=8, metadata=metadata)
        sent.append(result.id)
        try:
            text = result.get(timeout=60)["text"]
        except LoopCapExceeded as exc:
            assert hop == cap + 1 and exc.hops == cap + 1
            break
        parent = result.id
    else:
        pytest.fail("the ping-pong was never stopped")
    refused = sent[-1]
    assert [e["reason"] for e in dead_letters.list_entries(ROUTE_QUEUE)
            if e["task_id"] == refused] == ["loop_cap"]
    with session_scope() as session:
        charged = [row.message_id for row in session.scalars(select(LedgerRow))]
        held = [row.message_id for row in session.scalars(select(ReservationRow))
                if row.message_id == refused]
    assert sorted(charged) == sorted(sent[:-1]) and held == []  # no spend past the cap


@pytest.mark.usefixtures("workers")
def test_a_workflow_chain_feeding_each_answer_on_stops_at_the_hop_cap(
    sim: Any, endpoint: MakeEndpoint
) -> None:
    endpoint(sim, "wf-loop")
    add_agent("wf-looper")
    set_budget("wf-looper", usd="10")
    cap = 8  # the workers' AIMESH_MAX_HOPS (the default)
    # Step n quotes step n-1's answer: step n is n-1 hops from the first.
    steps = [Step(id="s0", prompt=f"start {uuid.uuid4().hex[:8]}", max_tokens=8)]
    steps += [Step(id=f"s{n}", prompt=f"answer {{{{ steps.s{n - 1}.text }}}}",
                   depends_on=[f"s{n - 1}"], max_tokens=8) for n in range(1, cap + 3)]
    run_id, pending = submit_workflow(Workflow(agent_id="wf-looper", steps=steps))
    result = pending.get(timeout=120)
    over = f"s{cap + 1}"
    assert result["status"] == "failed"
    assert sorted(result["outputs"]) == sorted(f"s{n}" for n in range(cap + 1))
    assert result["failures"][over]["code"] == "loop_cap_exceeded"
    assert result["failures"][over]["hops"] == cap + 1
    assert set(result["skipped"]) == {f"s{cap + 2}"}
    refused = f"{run_id}.{over}"
    [entry] = [e for e in dead_letters.list_entries(ROUTE_QUEUE) if e["task_id"] == refused]
    assert entry["reason"] == "loop_cap" and f"parent {run_id}.s{cap}" in entry["detail"]
    with session_scope() as session:
        charged = {row.message_id for row in session.scalars(select(LedgerRow))}
        held = [r for r in session.scalars(select(ReservationRow)) if r.message_id == refused]
    assert charged == {f"{run_id}.s{n}" for n in range(cap + 1)} and held == []
