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

from aimesh_tasks import Step, Workflow, outbox, submit_workflow
from aimesh_tasks.budgets import set_budget
from aimesh_tasks.db import CallAttemptRow, WorkflowRunRow, WorkflowStepRow, session_scope
from aimesh_tasks.errors import BudgetExceeded, InvalidInput
from aimesh_tasks.governance.agents import add_agent
from aimesh_tasks.registry import Endpoint
from aimesh_tasks.simulator import RunningSimulator
from aimesh_tasks.simulator.tokens import complete
from aimesh_tasks.workflows import run_view
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
