"""Workflows end to end: real router and endpoint workers, Redis broker and result backend,
Postgres, the simulator's deterministic answers as the truth about what each step sent."""

from __future__ import annotations

import os
import signal
import uuid
from collections.abc import Callable
from typing import Any

import pytest
import redis
from sqlalchemy import func, select

from aimesh_tasks import Step, Workflow, keys, outbox, submit_workflow
from aimesh_tasks.app import app
from aimesh_tasks.budgets import set_budget
from aimesh_tasks.db import CallAttemptRow, WorkflowRunRow, WorkflowStepRow, session_scope
from aimesh_tasks.errors import BudgetExceeded, InvalidInput, ProviderError, WorkflowCancelled
from aimesh_tasks.governance.agents import add_agent
from aimesh_tasks.messages import parse_message
from aimesh_tasks.pipeline import routing
from aimesh_tasks.pipeline.outcomes import HandOff, Refused
from aimesh_tasks.policies import Policies
from aimesh_tasks.policies.budget import BudgetAdmission
from aimesh_tasks.redis_client import get_redis
from aimesh_tasks.registry import Endpoint
from aimesh_tasks.simulator import RunningSimulator
from aimesh_tasks.simulator.tokens import complete
from aimesh_tasks.tasks.handoff import run_inline_callbacks
from aimesh_tasks.tasks.route import route_message
from aimesh_tasks.tasks.workflow import FAILED, RECORD, record_step, run_crashed
from aimesh_tasks.workflows import run_view, state
from aimesh_tasks.workflows.budget import Plan
from aimesh_tasks.workflows.cancellation import WorkflowCancellation, cancel
from aimesh_tasks.workflows.dag import validate_workflow
from aimesh_tasks.workflows.steps import step_message_dict
from tests.conftest import BROKER_DB, REDIS
from tests.gate import Gate
from tests.waits import wait_until

pytestmark = pytest.mark.usefixtures("workers")

Sim = Callable[..., RunningSimulator]
MakeEndpoint = Callable[..., Endpoint]
MakeGate = Callable[[RunningSimulator], Gate]
AGENT = "wf-agent"
SIM_WORDS = 16
GOOD = "good-model"  # the simulator's default completion_tokens


def _answer(prompt: str, max_tokens: int = 64) -> str:
    """What the simulator (seed 0) answers to one user prompt."""
    return complete(0, SIM_WORDS, [("user", prompt)], max_tokens).text


def _run(workflow: Workflow, timeout_s: float = 90) -> tuple[str, dict[str, Any]]:
    run_id, pending = submit_workflow(workflow)
    result: dict[str, Any] = pending.get(timeout=timeout_s)
    return run_id, result


def _steps(run_id: str) -> dict[str, WorkflowStepRow]:
    with session_scope() as session:
        rows = session.scalars(select(WorkflowStepRow).where(WorkflowStepRow.run_id == run_id))
        return {r.step_id: r for r in rows}


def _ok_calls(message_id: str) -> int:
    outbox.flush(wait_s=10)
    with session_scope() as session:
        return int(session.scalar(select(func.count()).select_from(CallAttemptRow).where(
            CallAttemptRow.message_id == message_id, CallAttemptRow.ok.is_(True))) or 0)


def _tag() -> str:
    return uuid.uuid4().hex[:8]  # distinct prompts per test: no answer from another test's cache


def test_linear_chain_feeds_each_answer_into_the_next_prompt(
    simulator: Sim, endpoint: MakeEndpoint
) -> None:
    sim = simulator()
    target = endpoint(sim, "chain")
    tag = _tag()
    flow = Workflow(agent_id=AGENT, steps=[
        Step(id="a", prompt=f"Name three colours {tag}", max_tokens=64),
        Step(id="b", prompt="Describe {{ steps.a.text }}", depends_on=["a"], max_tokens=64),
        Step(id="c", prompt="Judge: {{ steps.b.text }}!", depends_on=["b"], max_tokens=64),
    ])
    run_id, result = _run(flow)
    a = _answer(f"Name three colours {tag}")
    b = _answer(f"Describe {a}")
    assert result["status"] == "done"
    assert result["outputs"] == {"a": a, "b": b, "c": _answer(f"Judge: {b}!")}
    assert result["failures"] == {} and result["skipped"] == {}
    steps = _steps(run_id)
    assert {s.status for s in steps.values()} == {"done"}
    assert {s.endpoint_id for s in steps.values()} == {target.id}
    assert all(s.cost_nusd > 0 for s in steps.values())
    assert steps["a"].finished_at <= steps["b"].started_at  # type: ignore[operator]
    assert steps["b"].finished_at <= steps["c"].started_at  # type: ignore[operator]
    assert sim.stats()["calls"] == 3
    view = run_view(run_id)
    assert view["status"] == "done" and view["result"] == result


def _chord_keys() -> dict[str, int]:
    client = redis.Redis.from_url(f"{REDIS}/{BROKER_DB}")
    return {k.decode(): int(client.ttl(k)) for k in client.scan_iter("celery-taskset-meta-*")}


@pytest.mark.broker
def test_fan_out_of_fifty_then_gather_runs_the_gather_once(
    simulator: Sim, endpoint: MakeEndpoint
) -> None:
    sim = simulator()
    endpoint(sim, "fan", capacity=1000)
    tag = _tag()
    research = [Step(id=f"r{n}", prompt=f"Research topic {n} {tag}", max_tokens=16)
                for n in range(50)]
    quote = " | ".join(f"{{{{ steps.r{n}.text }}}}" for n in range(50))
    gather = Step(id="gather", prompt=f"Gather: {quote}", max_tokens=16,
                  depends_on=[s.id for s in research])
    run_id, result = _run(Workflow(agent_id=AGENT, steps=[*research, gather]))
    answers = [_answer(f"Research topic {n} {tag}", 16) for n in range(50)]
    assert result["status"] == "done"
    assert [result["outputs"][f"r{n}"] for n in range(50)] == answers
    assert result["outputs"]["gather"] == _answer("Gather: " + " | ".join(answers), 16)
    assert sim.stats()["calls"] == 51
    assert _ok_calls(f"{run_id}.gather") == 1
    _assert_no_chord_bookkeeping_left()


def _assert_no_chord_bookkeeping_left() -> None:
    """The chord's keys are deleted just after its callback is published: .j/.t/.s
    (results, count, size) must go; .c/.d (Celery's done markers) and saved group results
    may stay, but only with a TTL."""

    def left() -> dict[str, int]:
        return {k: ttl for k, ttl in _chord_keys().items()
                if k.endswith((".j", ".t", ".s")) or ttl < 0}

    wait_until(lambda: left() == {}, "no chord bookkeeping keys left (ttl -1: never expires)",
               seen=left)


@pytest.mark.broker
def test_diamond(simulator: Sim, endpoint: MakeEndpoint) -> None:
    sim = simulator()
    endpoint(sim, "diamond")
    tag = _tag()
    flow = Workflow(agent_id=AGENT, steps=[
        Step(id="join", prompt="Merge {{ steps.left.text }} with {{ steps.right.text }}",
             depends_on=["left", "right"]),
        Step(id="left", prompt="Left of {{ steps.top.text }}", depends_on=["top"]),
        Step(id="right", prompt="Right of {{ steps.top.text }}", depends_on=["top"]),
        Step(id="top", prompt=f"Start {tag}"),
    ])
    run_id, result = _run(flow)
    top = _answer(f"Start {tag}", 256)
    left, right = _answer(f"Left of {top}", 256), _answer(f"Right of {top}", 256)
    assert result["outputs"] == {"top": top, "left": left, "right": right,
                                 "join": _answer(f"Merge {left} with {right}", 256)}
    steps = _steps(run_id)
    assert max(steps["left"].finished_at, steps["right"].finished_at  # type: ignore[type-var]
               ) <= steps["join"].started_at  # type: ignore[operator]
    assert sim.stats()["calls"] == 4


@pytest.mark.parametrize(("steps", "words"), [
    ([Step(id="a", prompt="x", depends_on=["b"]), Step(id="b", prompt="y", depends_on=["a"])],
     "cycle: a -> b -> a"),
    ([Step(id="a", prompt="x", depends_on=["nowhere"])], "'nowhere' is not a step"),
])
def test_cycle_and_unknown_dependency_are_refused_and_nothing_runs(
    simulator: Sim, endpoint: MakeEndpoint, steps: list[Step], words: str
) -> None:
    sim = simulator()
    endpoint(sim, "refused")
    with pytest.raises(InvalidInput, match=words):
        submit_workflow(Workflow(agent_id=AGENT, steps=steps))
    with session_scope() as session:
        assert session.scalar(select(func.count()).select_from(WorkflowRunRow)) == 0
    assert sim.stats()["calls"] == 0


def _broken_pair(simulator: Sim, endpoint: MakeEndpoint, gate: MakeGate | None = None
                 ) -> tuple[RunningSimulator, RunningSimulator, list[Gate]]:
    """A good and an always-failing simulator; with `gate`, each is reached through one."""
    good, bad = simulator(), simulator(error_rate=1.0)
    gates = [gate(good), gate(bad)] if gate is not None else []
    # each step names its model, so routing sends it to one simulator only
    endpoint(gates[0] if gates else good, "good", model=GOOD)
    endpoint(gates[1] if gates else bad, "bad", model="broken-model")
    return good, bad, gates


def test_continue_policy_skips_only_the_failed_branch(
    simulator: Sim, endpoint: MakeEndpoint
) -> None:
    good, bad, _ = _broken_pair(simulator, endpoint)
    tag = _tag()
    flow = Workflow(agent_id=AGENT, policy="continue", steps=[
        Step(id="root", prompt=f"Plan {tag}", model=GOOD),
        Step(id="broken", prompt="Fail on {{ steps.root.text }}", depends_on=["root"],
             model="broken-model"),
        Step(id="after-broken", prompt="Use {{ steps.broken.text }}", depends_on=["broken"],
             model=GOOD),
        Step(id="fine", prompt="Work on {{ steps.root.text }}", depends_on=["root"], model=GOOD),
        Step(id="tail", prompt="Finish {{ steps.fine.text }}", depends_on=["fine"], model=GOOD),
    ])
    run_id, result = _run(flow)
    assert result["status"] == "failed"
    assert set(result["outputs"]) == {"root", "fine", "tail"}
    root = _answer(f"Plan {tag}", 256)
    assert result["outputs"]["tail"] == _answer(f"Finish {_answer(f'Work on {root}', 256)}", 256)
    assert result["failures"]["broken"]["code"] == "provider_error"
    assert result["failures"]["broken"]["status"] == 500
    assert "broken" in result["skipped"]["after-broken"]
    assert bad.stats()["calls"] == 1 and good.stats()["calls"] == 3
    assert {k: s.status for k, s in _steps(run_id).items()} == {
        "root": "done", "broken": "failed", "after-broken": "skipped", "fine": "done",
        "tail": "done"}


def _statuses(run_id: str) -> dict[str, str]:
    return {k: s.status for k, s in _steps(run_id).items()}


def test_fail_fast_cancels_what_has_not_started(
    simulator: Sim, endpoint: MakeEndpoint, gate: MakeGate
) -> None:
    good, bad, (slow_gate, broken_gate) = _broken_pair(simulator, endpoint, gate)
    tag = _tag()
    flow = Workflow(agent_id=AGENT, policy="fail_fast", steps=[
        Step(id="broken", prompt=f"Fail {tag}", model="broken-model"),
        Step(id="slow", prompt=f"Slow work {tag}", model=GOOD),
        Step(id="next", prompt="Continue {{ steps.slow.text }}", depends_on=["slow"],
             model=GOOD),
        Step(id="last", prompt="End {{ steps.next.text }}", depends_on=["next"], model=GOOD),
    ])
    run_id, pending = submit_workflow(flow)
    # Both roots are in their provider calls; then `broken` fails while `slow` still runs.
    slow_gate.wait_held()
    broken_gate.wait_held()
    broken_gate.open()
    wanted = {"broken": "failed", "slow": "running", "next": "skipped", "last": "skipped"}
    wait_until(lambda: _statuses(run_id) == wanted, f"step states {wanted}",
               seen=lambda: _statuses(run_id))
    slow_gate.open()
    result: dict[str, Any] = pending.get(timeout=90)
    assert result["status"] == "failed"
    assert set(result["failures"]) == {"broken"}
    assert set(result["skipped"]) == {"next", "last"}
    assert all("fail_fast" in reason for reason in result["skipped"].values())
    assert result["outputs"] == {"slow": _answer(f"Slow work {tag}", 256)}  # already running
    assert good.stats()["calls"] == 1 and bad.stats()["calls"] == 1


def test_workflow_over_budget_is_refused_before_any_step(
    simulator: Sim, endpoint: MakeEndpoint
) -> None:
    sim = simulator()
    endpoint(sim, "cheap", price_in="0.001", price_out="0.001")
    endpoint(sim, "dear", price_in="0.010", price_out="0.010")
    agent = f"wf-budget-{_tag()}"
    add_agent(agent)
    steps = [Step(id=f"s{n}", prompt=f"step {n}", max_tokens=500) for n in range(4)]
    # one step's worst case fits, four do not: at the dear endpoint each costs > $0.005
    set_budget(agent, usd="0.012")
    with pytest.raises(BudgetExceeded, match="needs up to") as caught:
        submit_workflow(Workflow(agent_id=agent, steps=steps))
    assert caught.value.fields["reason"] == "exhausted"
    assert caught.value.fields["left_usd"] == "0.012"
    with pytest.raises(BudgetExceeded, match="cap") as capped:
        submit_workflow(Workflow(agent_id=AGENT, steps=steps[:1], budget_usd="0.001"))
    assert capped.value.fields["reason"] == "workflow_cap"
    with session_scope() as session:
        assert session.scalar(select(func.count()).select_from(WorkflowRunRow)) == 0
    assert sim.stats()["calls"] == 0
    _, result = _run(Workflow(agent_id=agent, steps=steps[:1]))  # what fits does run
    assert result["status"] == "done"


@pytest.mark.broker
def test_sigkill_during_a_chord_header_still_ends_the_run_and_gathers_once(
    simulator: Sim, endpoint: MakeEndpoint, gate: MakeGate
) -> None:
    sim = simulator()
    held = gate(sim)
    endpoint(held, "kill", capacity=100)
    tag = _tag()
    header = [Step(id=f"h{n}", prompt=f"Header {n} {tag}") for n in range(3)]
    gather = Step(id="gather", prompt="All: " + " ".join(
        f"{{{{ steps.h{n}.text }}}}" for n in range(3)), depends_on=[s.id for s in header])
    run_id, pending = submit_workflow(Workflow(agent_id=AGENT, steps=[*header, gather]))
    victim = held.wait_held()[0]  # a header step's call: answered, not yet received
    os.kill(held.caller_pid(victim), signal.SIGKILL)
    held.open()
    result = pending.get(timeout=120)
    answers = [_answer(f"Header {n} {tag}", 256) for n in range(3)]
    assert result["status"] == "done"
    assert result["outputs"]["gather"] == _answer("All: " + " ".join(answers), 256)
    assert sim.stats()["calls"] == 5  # three headers, the killed one again, the gather
    assert _ok_calls(f"{run_id}.gather") == 1
    assert {s.status for s in _steps(run_id).values()} == {"done"}
    _assert_no_chord_bookkeeping_left()


def test_cli_runs_a_file_and_shows_its_status(
    simulator: Sim, endpoint: MakeEndpoint, tmp_path: Any
) -> None:
    import json

    from typer.testing import CliRunner

    from aimesh_tasks.cli.main import cli

    endpoint(simulator(), "cli")
    tag = _tag()
    path = tmp_path / "flow.yaml"
    path.write_text(f"agent_id: {AGENT}\nsteps:\n  - id: a\n    prompt: 'cli {tag}'\n"
                    "  - id: b\n    prompt: 'then {{ steps.a.text }}'\n"
                    "    depends_on: [a]\n")
    runner = CliRunner()
    done = runner.invoke(cli, ["workflow", "run", str(path), "--wait", "--json"])
    assert done.exit_code == 0, done.output
    view = json.loads(done.output)
    assert [s["status"] for s in view["steps"]] == ["done", "done"]
    shown = runner.invoke(cli, ["workflow", "status", view["run_id"]])
    assert shown.exit_code == 0 and "done" in shown.output and "b" in shown.output
    bad = tmp_path / "cycle.json"
    bad.write_text(json.dumps({"agent_id": AGENT, "steps": [
        {"id": "a", "prompt": "x", "depends_on": ["a"]}]}))
    refused = runner.invoke(cli, ["workflow", "run", str(bad)])
    assert refused.exit_code == 2 and "cycle: a -> a" in refused.stderr


def _called(sim: RunningSimulator, run_id: str) -> list[str]:
    """The steps of `run_id` that called `sim`, in the order the calls reached it."""
    prefix = f"{run_id}."
    return [c["call_key"][len(prefix):].split(":")[0] for c in sim.calls()
            if (c["call_key"] or "").startswith(prefix)]


def test_a_step_starts_when_its_own_dependencies_are_done_not_its_level(
    simulator: Sim, endpoint: MakeEndpoint, gate: MakeGate
) -> None:
    good, slow = simulator(), simulator()
    held = gate(slow)
    endpoint(good, "good", model=GOOD)
    endpoint(held, "slow", model="slow-model")
    tag = _tag()
    # a -> c, a -> d, b -> d: not series-parallel; levelled, c would wait for b.
    flow = Workflow(agent_id=AGENT, steps=[
        Step(id="a", prompt=f"Fast root {tag}", model=GOOD),
        Step(id="b", prompt=f"Slow root {tag}", model="slow-model"),
        Step(id="c", prompt="After a: {{ steps.a.text }}", depends_on=["a"], model=GOOD),
        Step(id="d", prompt="After both: {{ steps.a.text }} {{ steps.b.text }}",
             depends_on=["a", "b"], model=GOOD),
    ])
    run_id, pending = submit_workflow(flow)
    held.wait_held()  # b has its answer, held at the gate: b has not finished
    wait_until(lambda: _statuses(run_id).get("c") == "done", "c done while b is held",
               seen=lambda: (_statuses(run_id), _called(good, run_id)))
    assert _called(good, run_id) == ["a", "c"]  # d waits for b
    assert _statuses(run_id)["b"] == "running" and _statuses(run_id)["d"] == "pending"
    held.open()
    result: dict[str, Any] = pending.get(timeout=90)
    assert result["status"] == "done"
    assert _called(good, run_id) == ["a", "c", "d"] and _called(slow, run_id) == ["b"]
    a, b = _answer(f"Fast root {tag}", 256), _answer(f"Slow root {tag}", 256)
    assert result["outputs"]["d"] == _answer(f"After both: {a} {b}", 256)


def _answered(step_id: str) -> dict[str, Any]:
    """What a step's message returns when it is answered (the fields the record reads)."""
    return {"text": f"answer of {step_id}", "endpoint_id": "e1", "input_tokens": 3,
            "output_tokens": 2, "cost_usd": "0.000005", "agent_id": AGENT}


def _ids(sends: tuple[state.Send, ...]) -> list[str]:
    return [send.step_id for send in sends]


def _create(flow: Workflow) -> tuple[str, state.Advance]:
    run_id = uuid.uuid4().hex
    return run_id, state.create_run(run_id, flow, validate_workflow(flow, 10), Plan({}))


@pytest.mark.usefixtures("clean")
def test_a_completion_delivered_twice_counts_once_and_starts_its_dependents_once() -> None:
    # Only the state: nothing is published, so no worker touches this run.
    flow = Workflow(agent_id=AGENT, steps=[
        Step(id="r0", prompt="zero"), Step(id="r1", prompt="one"),
        Step(id="g", prompt="{{ steps.r0.text }} + {{ steps.r1.text }}",
             depends_on=["r0", "r1"])])
    run_id, started = _create(flow)
    assert _ids(started.start) == ["r0", "r1"]
    first, again = (state.end_step(run_id, "r0", _answered("r0")) for _ in range(2))
    assert (first.start, again.start, again.resend) == ((), (), ())  # r0 counted once
    assert _statuses(run_id) == {"r0": "done", "r1": "running", "g": "pending"}
    last = state.end_step(run_id, "r1", _answered("r1"))
    assert _ids(last.start) == ["g"]
    assert last.start[0].message.messages[-1].content == "answer of r0 + answer of r1"
    g_started = _steps(run_id)["g"].started_at
    redelivered = state.end_step(run_id, "r1", _answered("r1"))
    assert redelivered.start == () and _ids(redelivered.resend) == ["g"]
    assert redelivered.resend[0].message.messages == last.start[0].message.messages
    assert redelivered.resend[0].message.id == last.start[0].message.id == f"{run_id}.g"
    assert _steps(run_id)["g"].started_at == g_started and redelivered.result is None
    done = state.end_step(run_id, "g", _answered("g"))
    assert done.result is not None and done.result["status"] == "done"
    assert state.end_step(run_id, "g", _answered("g")).result == done.result


@pytest.mark.usefixtures("clean")
def test_fail_fast_cancels_pending_steps_and_skips_a_queued_one_refused_at_routing() -> None:
    flow = Workflow(agent_id=AGENT, policy="fail_fast", steps=[
        Step(id="bad", prompt="fails"), Step(id="queued", prompt="waits in the queue"),
        Step(id="after", prompt="{{ steps.queued.text }}", depends_on=["queued"])])
    run_id, _ = _create(flow)
    failed = state.end_step(run_id, "bad", {"error": ProviderError("boom").to_dict()})
    assert failed.cancelled and failed.start == () and failed.result is None
    assert _statuses(run_id) == {"bad": "failed", "queued": "running", "after": "skipped"}
    refusal = WorkflowCancelled("cancelled", run_id=run_id)
    ended = state.end_step(run_id, "queued", {"error": refusal.to_dict()})
    assert ended.result is not None and ended.result["status"] == "failed"
    assert ended.result["skipped"]["queued"] == state.CANCELLED
    assert set(ended.result["failures"]) == {"bad"}


@pytest.mark.usefixtures("clean")
def test_a_run_that_cannot_go_on_ends_failed_and_a_late_answer_changes_nothing() -> None:
    flow = Workflow(agent_id=AGENT, policy="continue", steps=[
        Step(id="a", prompt="one"), Step(id="b", prompt="{{ steps.a.text }}", depends_on=["a"])])
    run_id, _ = _create(flow)
    ended = state.fail_run(run_id, "RuntimeError: boom")
    assert ended.result is not None and ended.result["status"] == "failed"
    assert ended.result["error"] == "RuntimeError: boom"
    assert ended.result["skipped"] == {"a": "RuntimeError: boom", "b": "RuntimeError: boom"}
    late = state.end_step(run_id, "a", _answered("a"))  # its answer arrives afterwards
    assert late.result == ended.result and late.start == late.resend == ()
    assert state.fail_run(run_id, "again").result == ended.result
    assert _statuses(run_id) == {"a": "skipped", "b": "skipped"}


def test_a_cancelled_runs_step_is_refused_at_routing_and_nothing_else_is(
    simulator: Sim, endpoint: MakeEndpoint
) -> None:
    endpoint(simulator(), "cancelled")
    run_id, policies = uuid.uuid4().hex, Policies([WorkflowCancellation(), BudgetAdmission()])

    def step(step_id: str) -> Any:
        return parse_message(step_message_dict(AGENT, Step(id=step_id, prompt="p"), run_id,
                                               f"prompt {step_id} {run_id}"))

    assert isinstance(routing.route(app, step("early"), policies=policies), HandOff)
    cancel(run_id)
    outcome = routing.route(app, step("late"), policies=policies)
    assert isinstance(outcome, Refused) and isinstance(outcome.error, WorkflowCancelled)
    assert outcome.error.run_id == run_id
    # The same metadata on a message that is not one of the run's steps reads nothing.
    other = parse_message({"agent_id": AGENT, "prompt": f"other {run_id}",
                           "metadata": {"workflow_run": run_id}})
    assert isinstance(routing.route(app, other, policies=policies), HandOff)


def test_record_killed_after_its_commit_is_redelivered_and_sends_the_next_step_once(
    simulator: Sim, endpoint: MakeEndpoint
) -> None:
    sim = simulator()
    endpoint(sim, "kill-record")
    agent = "wf-kill-record"  # its first answered record pauses after commit (conftest)
    tag = _tag()
    flow = Workflow(agent_id=agent, steps=[
        Step(id="a", prompt=f"First {tag}"),
        Step(id="b", prompt="Then {{ steps.a.text }}", depends_on=["a"])])
    run_id, pending = submit_workflow(flow)
    pid = int(wait_until(lambda: get_redis().get(keys.failpoint("after_record")),
                         "a's record paused after its commit"))
    assert _statuses(run_id) == {"a": "done", "b": "running"}  # committed, b not yet sent
    b_started = _steps(run_id)["b"].started_at
    os.kill(pid, signal.SIGKILL)
    result: dict[str, Any] = pending.get(timeout=120)
    a = _answer(f"First {tag}", 256)
    assert result["status"] == "done" and result["outputs"]["b"] == _answer(f"Then {a}", 256)
    assert _called(sim, run_id) == ["a", "b"] and _ok_calls(f"{run_id}.b") == 1
    assert _steps(run_id)["b"].started_at == b_started


@pytest.mark.usefixtures("clean")
def test_a_record_runs_inline_and_one_that_fails_is_left_to_be_sent_as_a_task() -> None:
    run_id, _ = _create(Workflow(agent_id=AGENT, steps=[Step(id="only", prompt="alone")]))
    callbacks = [record_step.s(run_id, "only"), record_step.s("no-such-run", "only"),
                 run_crashed.s(run_id)]  # the last has no run_inline
    route_message.push_request(callbacks=[dict(c) for c in callbacks])
    try:
        run_inline_callbacks(route_message, _answered("only"))
        left = route_message.request.callbacks
    finally:
        route_message.pop_request()
    assert [(c["task"], c["args"][0]) for c in left] == [(RECORD, "no-such-run"),
                                                         (FAILED, run_id)]
    assert _statuses(run_id) == {"only": "done"}
    assert app.AsyncResult(run_id).get(timeout=30)["outputs"] == {"only": "answer of only"}
