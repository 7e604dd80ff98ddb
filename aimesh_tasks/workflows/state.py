"""Run and step state in the database, and the dependency counters that start each step
when its own dependencies are done.

    pending ──(its last dependency done)──▶ running ──▶ done | failed
       └──(a dependency failed or was skipped; fail_fast cancelled the run)──▶ skipped

A running step has had its message sent: it is queued for routing or being answered.

**How a step starts.** Each step row counts its dependencies not yet done (`waiting_on`,
set at submit) and each run row its steps not yet ended (`steps_left`). Ending a step
(`end_step`) is one transaction: it records the step's answer or failure on the step's
row, takes the run row's lock by counting the step off `steps_left`, and counts it off
the `waiting_on` of each pending step that depends on it. A step whose count reaches 0
is marked running and its message rendered from its dependencies' outputs; a pending
step that a failed or skipped dependency can never feed is skipped, and counted off in
turn; the run ends when `steps_left` reaches 0. The caller publishes the messages of the
steps it started once the transaction has committed (`Advance`, `tasks/workflow.py`).
A step therefore waits for its own dependencies only, in any DAG, series-parallel or not.

Why counters in Postgres, and not chords (a series-parallel DAG compiles exactly to
chains inside groups and chords, but any other DAG needs a second mechanism anyway):
- one mechanism for every DAG, O(1) per dependency;
- atomic with the state: a count changes in the same transaction as the status that
  causes it, so the counters and the steps' states cannot disagree, and both survive
  what Postgres survives. A chord keeps its count in Redis (`celery-taskset-meta-*`),
  apart from the run's state, where a Redis restart can lose it;
- idempotent under redelivery: a step is counted off only by the transaction whose
  UPDATE moved it from pending or running to an end, which matches once; a completion
  delivered again matches nothing, so it decrements nothing and starts nothing;
- fewer hops: a step is its message's route and call, then the record that ends it and
  starts what follows; no step task, no barrier, no chord join.

A completion delivered again (its record task redelivered after the worker died between
commit and publish, or the callback of a duplicated call) sends again the messages of
the dependents that are running and not ended (`Advance.resend`), since the first
delivery may have died before publishing them. A message sent twice is one call and one
charge on the message path (hand-off record, call lease, journal).

Locks: a transaction writes its own step's row, then locks the run row, and only then
writes other steps' rows; the run row is locked for the counting and the commit only. So
every decision about the steps that follow (start, skip, fail_fast's cancel, the end of
the run) is made by one transaction at a time, which sees every completion committed
before it, and two records never wait for each other: the only row one holds before the
run's lock is its own running step, which no other record writes.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from decimal import Decimal
from functools import lru_cache
from typing import Any, NamedTuple

from sqlalchemy import Table, and_, bindparam, select, update
from sqlalchemy.orm import Session

from aimesh_tasks.db import WorkflowRunRow, WorkflowStepRow, session_scope
from aimesh_tasks.errors import InvalidMessage, NotFound, WorkflowCancelled
from aimesh_tasks.messages import AiMessage, utcnow
from aimesh_tasks.money import nusd_to_usd, usd_to_nusd
from aimesh_tasks.workflows.budget import Plan
from aimesh_tasks.workflows.dag import dependents, feeders, levels
from aimesh_tasks.workflows.model import Step, Workflow
from aimesh_tasks.workflows.steps import message_id, step_message

UNFINISHED = ("pending", "running")
CANCELLED = "cancelled: another step failed and the policy is fail_fast"
Row = WorkflowStepRow
Run = WorkflowRunRow
_NO_SYNC = {"synchronize_session": False}  # no step rows are loaded as objects here

# Built once, bound per call: the statements of the path every step's end takes.
_STEPS: Table = Row.__table__  # type: ignore[assignment]
_RUNS: Table = Run.__table__  # type: ignore[assignment]
_OUTCOME = ("status", "output", "error", "endpoint_id", "cached", "input_tokens",
            "output_tokens", "cost_nusd", "finished_at")
_END = update(_STEPS).where(
    _STEPS.c.run_id == bindparam("run"), _STEPS.c.step_id == bindparam("step"),
    _STEPS.c.status.in_(UNFINISHED)).values({c: bindparam(c) for c in _OUTCOME}).returning(
    _STEPS.c.step_id)
_COUNT_OFF_RUN = update(_RUNS).where(_RUNS.c.id == bindparam("run")).values(
    steps_left=_RUNS.c.steps_left - 1).returning(_RUNS.c.status, _RUNS.c.steps_left)
_COUNT_OFF_DEPENDENTS = update(_STEPS).where(
    _STEPS.c.run_id == bindparam("run"), _STEPS.c.step_id.in_(bindparam("steps", expanding=True)),
    _STEPS.c.status == "pending").values(waiting_on=_STEPS.c.waiting_on - 1).returning(
    _STEPS.c.step_id, _STEPS.c.waiting_on)


class Send(NamedTuple):
    """A started step and the message it sends."""

    step_id: str
    message: AiMessage


@dataclass(frozen=True)
class Advance:
    """What a committed change of a run asks for: send the messages of the steps it
    started (and, for a completion delivered again, of those started before), refuse the
    run's queued steps (fail_fast cancelled it), store the run's result (it ended)."""

    start: tuple[Send, ...] = ()
    resend: tuple[Send, ...] = ()
    cancelled: bool = False
    result: dict[str, Any] | None = None


@dataclass(frozen=True)
class Graph:
    """What a run's transactions read of its definition, which never changes."""

    run_id: str
    name: str
    agent_id: str
    policy: str
    steps: dict[str, Step]
    dependents: dict[str, list[str]]
    fed_from: dict[str, str | None]  # the answer a step's message counts its hops from

    @classmethod
    def of(cls, run_id: str, name: str, agent_id: str, policy: str,
           definition: dict[str, Any]) -> Graph:
        steps = [Step.model_validate(s) for s in definition["steps"]]
        return cls(run_id, name, agent_id, policy, {s.id: s for s in steps},
                   dependents(definition["steps"]), feeders(steps, levels(steps)))


@lru_cache(maxsize=256)
def _graph(run_id: str) -> Graph:
    """The run's graph, read once per process (a definition is immutable)."""
    with session_scope() as session:
        row = session.execute(select(Run.name, Run.agent_id, Run.policy, Run.definition)
                              .where(Run.id == run_id)).first()
    if row is None:
        raise NotFound(f"no workflow run '{run_id}'", kind="workflow_run", id=run_id)
    return Graph.of(run_id, row.name, row.agent_id, row.policy, row.definition)


def _of(run_id: str, *step_ids: str) -> Any:
    return and_(Row.run_id == run_id, Row.step_id.in_(step_ids))


def _outcome(result: dict[str, Any]) -> dict[str, Any]:
    """The step row's columns (`_OUTCOME`) for a step's answer or error."""
    values = {"output": None, "error": None, "endpoint_id": None, "cached": False,
              "input_tokens": 0, "output_tokens": 0, "cost_nusd": 0, "finished_at": utcnow()}
    error = result.get("error")
    if error is not None and error.get("code") == WorkflowCancelled.code:
        return {**values, "status": "skipped", "error": {"reason": CANCELLED}}
    if error is not None:
        return {**values, "status": "failed", "error": dict(error)}
    return {**values, "status": "done", "output": str(result["text"]),
            "endpoint_id": result["endpoint_id"],
            "cached": bool(result.get("cached") or result.get("dedup")),
            "input_tokens": result["input_tokens"], "output_tokens": result["output_tokens"],
            "cost_nusd": usd_to_nusd(Decimal(str(result["cost_usd"])))}


def _message(session: Session, graph: Graph, step_id: str) -> AiMessage:
    """The step's message, rendered from its dependencies' outputs (all done)."""
    step = graph.steps[step_id]
    outputs = {row.step_id: row.output or "" for row in session.execute(
        select(Row.step_id, Row.output).where(_of(graph.run_id, *step.depends_on)))}
    return step_message(graph.agent_id, step, graph.run_id, outputs, graph.fed_from[step_id])


class _Change:
    """One transaction's changes to a run whose row it has locked: steps end, and what
    depends on them starts or is skipped."""

    def __init__(self, session: Session, graph: Graph, status: str, steps_left: int) -> None:
        self.session, self.graph = session, graph
        self.status, self.steps_left = status, steps_left  # the run row, as locked
        self.cancelled = False  # fail_fast cancelled the run here
        self.counted = 0  # steps ended here and not yet counted off the run row
        self.started: list[Send] = []

    def ended(self, ends: list[tuple[str, str]]) -> None:
        """These steps (id, status) just ended: apply the policy, then count them off
        what depends on them, starting or skipping it, transitively."""
        while ends:
            step_id, status = ends.pop()
            if status == "failed" and self.graph.policy == "fail_fast":
                self._cancel(step_id)
            following = self.graph.dependents[step_id]
            if not following:
                continue
            if status != "done":
                for skipped in self._skip(following, f"dependency {step_id} did not finish"):
                    ends.append((skipped, "skipped"))
                continue
            ready = self.session.execute(_COUNT_OFF_DEPENDENTS, {
                "run": self.graph.run_id, "steps": following}).all()
            for step_id_ready, waiting_on in ready:
                if waiting_on == 0 and not self._start(step_id_ready):
                    ends.append((step_id_ready, "failed"))

    def _skip(self, step_ids: list[str], reason: str) -> list[str]:
        skipped = list(self.session.scalars(update(Row).where(
            _of(self.graph.run_id, *step_ids), Row.status == "pending").values(
            status="skipped", finished_at=utcnow(), error={"reason": reason})
            .returning(Row.step_id), execution_options=_NO_SYNC))
        self.counted += len(skipped)
        return skipped

    def _start(self, step_id: str) -> bool:
        """Mark the step running and queue its message; False if the message is invalid
        (e.g. the rendered prompt is over the payload cap): the step then failed."""
        try:
            message = _message(self.session, self.graph, step_id)
        except InvalidMessage as exc:
            values: dict[str, Any] = {"status": "failed", "error": exc.to_dict(),
                                      "finished_at": utcnow()}
            self.counted += 1
        else:
            values = {"status": "running", "started_at": utcnow()}
            self.started.append(Send(step_id, message))
        self.session.execute(update(Row).where(_of(self.graph.run_id, step_id))
                             .values(**values), execution_options=_NO_SYNC)
        return bool(values["status"] == "running")

    def _cancel(self, failed_step: str) -> None:
        if self.status == "failed":
            return
        self.status, self.cancelled = "failed", True
        reason = f"cancelled: step '{failed_step}' failed and the policy is fail_fast"
        skipped = self.session.execute(update(Row).where(
            Row.run_id == self.graph.run_id, Row.status == "pending").values(
            status="skipped", finished_at=utcnow(), error={"reason": reason}),
            execution_options=_NO_SYNC)
        self.counted += skipped.rowcount  # type: ignore[attr-defined]

    def advance(self, resend: tuple[Send, ...] = ()) -> Advance:
        """Write the run row's new count and status, end the run if no step is left,
        and say what to do after commit."""
        run_id, result = self.graph.run_id, None
        self.steps_left -= self.counted
        values: dict[str, Any] = {"steps_left": self.steps_left, "status": self.status}
        if self.steps_left == 0:
            steps = _steps(self.session, run_id)
            values["status"] = "done" if all(s.status == "done" for s in steps) else "failed"
            values["finished_at"] = utcnow()
            values["result"] = result = _result(self.graph, values["status"], steps)
        if self.counted or self.steps_left == 0 or self.cancelled:
            self.session.execute(update(Run).where(Run.id == run_id).values(**values),
                                 execution_options=_NO_SYNC)
        return Advance(tuple(self.started), resend, cancelled=(
            self.graph.policy == "fail_fast" and values["status"] == "failed"
            and result is None), result=result)


def _new_rows(run_id: str, workflow: Workflow, levels: list[list[str]]
              ) -> tuple[list[Row], list[Send]]:
    """The step rows of a new run: the roots running (their messages sent), or failed
    when their message is invalid; under fail_fast, a failed root leaves the others
    pending, and its cancel skips them."""
    sends, errors, now = [], {}, utcnow()
    for step in workflow.steps:
        if not step.depends_on:
            try:
                sends.append(Send(step.id, step_message(workflow.agent_id, step, run_id, {})))
            except InvalidMessage as exc:
                errors[step.id] = exc.to_dict()
    if errors and workflow.policy == "fail_fast":
        sends = []
    sent = {s.step_id for s in sends}
    level_of = {step_id: n for n, level in enumerate(levels) for step_id in level}
    rows = [Row(run_id=run_id, step_id=step.id, position=n, level=level_of[step.id],
                message_id=message_id(run_id, step.id),
                status="running" if step.id in sent else (
                    "failed" if step.id in errors else "pending"),
                error=errors.get(step.id), depends_on=list(step.depends_on),
                waiting_on=len(step.depends_on),
                started_at=now if step.id in sent else None,
                finished_at=now if step.id in errors else None,
                input_tokens=0, output_tokens=0, cost_nusd=0, cached=False)
            for n, step in enumerate(workflow.steps)]
    return rows, sends


def create_run(run_id: str, workflow: Workflow, levels: list[list[str]], plan: Plan
               ) -> Advance:
    """Record a run and its steps, the steps that depend on nothing already started."""
    rows, sends = _new_rows(run_id, workflow, levels)
    failed = [(r.step_id, "failed") for r in rows if r.status == "failed"]
    with session_scope() as session:
        session.add(Run(
            id=run_id, name=workflow.name, agent_id=workflow.agent_id, policy=workflow.policy,
            status="running", definition=workflow.to_json_dict(), result=None,
            planned_tokens=plan.tokens, planned_nusd=plan.nusd, steps_left=len(rows),
            created_at=utcnow(), started_at=utcnow()))
        session.flush()
        session.add_all(rows)
        session.flush()
        graph = Graph.of(run_id, workflow.name, workflow.agent_id, workflow.policy,
                         workflow.to_json_dict())
        change = _Change(session, graph, "running", len(rows))
        change.started, change.counted = list(sends), len(failed)
        change.ended(failed)
        return change.advance()


def _again(session: Session, run_id: str, step_id: str) -> Advance:
    """A completion of a step that has already ended (see the module docstring)."""
    run = session.execute(select(Run.status, Run.result).where(Run.id == run_id)).first()
    if run is None or session.scalar(select(Row.status).where(_of(run_id, step_id))) is None:
        raise NotFound(f"workflow run '{run_id}' has no step '{step_id}'", kind="workflow_step",
                       id=f"{run_id}/{step_id}")
    if run.result is not None:
        return Advance(result=dict(run.result))
    graph = _graph(run_id)
    running = session.scalars(select(Row.step_id).where(
        _of(run_id, *graph.dependents[step_id]), Row.status == "running"))
    return Advance(resend=tuple(Send(d, _message(session, graph, d)) for d in running),
                   cancelled=graph.policy == "fail_fast" and run.status == "failed")


def end_step(run_id: str, step_id: str, result: dict[str, Any]) -> Advance:
    """Record a step's answer (an AiResult dict) or its failure ({"error": {...}}; a
    WorkflowCancelled error skips it), and start or skip the steps it unblocks. Under
    fail_fast a failure cancels the run: every step not yet started is skipped."""
    values = _outcome(result)
    graph = _graph(run_id)
    with session_scope() as session:
        ended = session.execute(_END, {"run": run_id, "step": step_id, **values}).first()
        if ended is None:
            return _again(session, run_id, step_id)
        # The run's lock, held to the commit.
        status, steps_left = session.execute(_COUNT_OFF_RUN, {"run": run_id}).one()
        change = _Change(session, graph, status, steps_left)
        change.ended([(step_id, values["status"])])
        return change.advance()


def _steps(session: Session, run_id: str) -> list[Row]:
    # populate_existing: rows this session added are refreshed from the statements since
    return list(session.scalars(select(Row).where(Row.run_id == run_id)
                                .order_by(Row.position)
                                .execution_options(populate_existing=True)))


def _result(graph: Graph, status: str, steps: Iterable[Row]) -> dict[str, Any]:
    steps = list(steps)
    return {
        "run_id": graph.run_id, "name": graph.name, "status": status, "policy": graph.policy,
        "outputs": {s.step_id: s.output for s in steps if s.status == "done"},
        "failures": {s.step_id: s.error for s in steps if s.status == "failed"},
        "skipped": {s.step_id: (s.error or {}).get("reason") for s in steps
                    if s.status == "skipped"},
        "cost_usd": str(nusd_to_usd(sum(s.cost_nusd for s in steps))),
        "tokens": sum(s.input_tokens + s.output_tokens for s in steps),
    }


def fail_run(run_id: str, reason: str) -> Advance:
    """End a run that cannot go on (a task of it raised unexpectedly, or its first steps
    could not be queued): failed, unfinished steps skipped."""
    with session_scope() as session:
        finished = session.scalar(select(Run.result).where(Run.id == run_id))
        if finished is not None:
            return Advance(result=dict(finished))
        session.execute(update(Row).where(Row.run_id == run_id, Row.status.in_(UNFINISHED))
                        .values(status="skipped", finished_at=utcnow(),
                                error={"reason": reason}), execution_options=_NO_SYNC)
        run = session.get(Run, run_id, with_for_update=True)  # steps first: see Locks
        if run is None or run.result is not None:
            return Advance(result=None if run is None else dict(run.result or {}))
        graph = Graph.of(run_id, run.name, run.agent_id, run.policy, run.definition)
        run.status, run.finished_at, run.steps_left = "failed", utcnow(), 0
        run.result = {**_result(graph, "failed", _steps(session, run_id)), "error": reason}
        return Advance(result=dict(run.result))
