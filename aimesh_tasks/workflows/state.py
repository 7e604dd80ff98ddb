"""Run and step state in the database, and the rule that starts a step when its own
dependencies are done.

    pending ──(every dependency done)──▶ running ──▶ done | failed
       └──(a dependency failed or was skipped; fail_fast cancelled the run)──▶ skipped

A running step has had its message sent: it is queued for routing or being answered.

**How a step starts.** Ending a step (`end_step`) is one transaction: it locks the run
row, records the step's answer or failure, then looks at each step that depends on it.
One still pending whose dependencies are now all done (one COUNT over their rows) is
marked running, its message rendered from their outputs; one that a failed or skipped
dependency can never feed is skipped, and its own dependents are looked at in turn. The
caller publishes the messages of the steps it started once the transaction has
committed (`Advance`, `tasks/workflow.py`). A step therefore waits for its own
dependencies only, in any DAG, series-parallel or not.

Why a count of the dependencies' rows, and not chords (a series-parallel DAG compiles
exactly to chains inside groups and chords, but any other DAG needs a second mechanism):
- one mechanism for every DAG;
- the count cannot drift from the run's state, because it is that state: the
  dependencies' own rows, read under the run's lock. A chord keeps its count in Redis
  (`celery-taskset-meta-*`), apart from the state in Postgres, and a Redis restart can
  lose it;
- atomic and idempotent by construction: a dependency counts as done only in the
  transaction that ends it, which runs once, since a completion delivered again finds
  its step ended and changes nothing; so no dependency is counted twice and no step
  moves to running twice;
- fewer hops: a step is its message's route and call, then the record that ends it and
  starts what follows; no step task, no barrier, no chord join; and no migration.

A completion delivered again (its record task redelivered after the worker died between
commit and publish, or the callback of a duplicated call) starts nothing; it sends again
the messages of the dependents that are running and not ended (`Advance.resend`), since
the first delivery may have died before publishing them. A message sent twice is one
call and one charge on the message path (hand-off record, call lease, journal).

Every change locks the run row first and writes step rows only under that lock, so a
step starting and a failing step cancelling the run (fail_fast) never interleave.
"""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal
from typing import Any, NamedTuple

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from aimesh_tasks.db import WorkflowRunRow, WorkflowStepRow, session_scope
from aimesh_tasks.errors import InvalidMessage, NotFound, WorkflowCancelled
from aimesh_tasks.messages import AiMessage, utcnow
from aimesh_tasks.money import nusd_to_usd, usd_to_nusd
from aimesh_tasks.workflows.budget import Plan
from aimesh_tasks.workflows.dag import dependents
from aimesh_tasks.workflows.model import Step, Workflow
from aimesh_tasks.workflows.steps import message_id, step_message

ENDED = ("done", "failed", "skipped")
CANCELLED = "cancelled: another step failed and the policy is fail_fast"


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


def _skip(row: WorkflowStepRow, reason: str) -> None:
    row.status, row.error, row.finished_at = "skipped", {"reason": reason}, utcnow()


class _Change:
    """One transaction's changes to a locked run: steps end, and what follows them starts
    or is skipped."""

    def __init__(self, session: Session, run: WorkflowRunRow) -> None:
        self.session, self.run = session, run
        steps = run.definition["steps"]
        self.definitions = {s["id"]: s for s in steps}
        self.dependents = dependents(steps)
        self.started: list[Send] = []

    def row(self, step_id: str) -> WorkflowStepRow:
        row = self.session.get(WorkflowStepRow, (self.run.id, step_id))
        assert row is not None, f"run {self.run.id} has no row for its step {step_id}"
        return row

    def ended(self, row: WorkflowStepRow) -> None:
        """`row` just ended: apply the policy, then start or skip what depends on it."""
        ends = [row]
        while ends:
            ended = ends.pop()
            if ended.status == "failed" and self.run.policy == "fail_fast":
                self._cancel(ended.step_id)
            for step_id in self.dependents[ended.step_id]:
                dependent = self.row(step_id)
                if dependent.status != "pending":
                    continue
                if ended.status != "done":
                    _skip(dependent, f"dependency {ended.step_id} did not finish")
                    ends.append(dependent)
                elif self._undone(dependent) == 0 and not self._start(dependent):
                    ends.append(dependent)  # it failed before it could be sent

    def start_roots(self, rows: list[WorkflowStepRow]) -> None:
        """Start the steps that depend on nothing."""
        for row in rows:  # a root that fails under fail_fast skips the roots after it
            if not row.depends_on and row.status == "pending" and not self._start(row):
                self.ended(row)

    def _undone(self, row: WorkflowStepRow) -> int:
        return int(self.session.scalar(select(func.count()).select_from(WorkflowStepRow).where(
            WorkflowStepRow.run_id == self.run.id, WorkflowStepRow.step_id.in_(row.depends_on),
            WorkflowStepRow.status != "done")) or 0)

    def message(self, row: WorkflowStepRow) -> AiMessage:
        """The step's message, rendered from its dependencies' outputs (all done)."""
        outputs = dict(self.session.execute(select(
            WorkflowStepRow.step_id, WorkflowStepRow.output).where(
            WorkflowStepRow.run_id == self.run.id,
            WorkflowStepRow.step_id.in_(row.depends_on))).all())
        step = Step.model_validate(self.definitions[row.step_id])
        return step_message(self.run.agent_id, step, self.run.id,
                            {k: v or "" for k, v in outputs.items()})

    def _start(self, row: WorkflowStepRow) -> bool:
        """Mark the step running and queue its message; False if the message is invalid
        (e.g. the rendered prompt is over the payload cap): the step then failed."""
        try:
            message = self.message(row)
        except InvalidMessage as exc:
            row.status, row.error, row.finished_at = "failed", exc.to_dict(), utcnow()
            return False
        row.status, row.started_at = "running", utcnow()
        if self.run.status == "pending":
            self.run.status, self.run.started_at = "running", row.started_at
        self.started.append(Send(row.step_id, message))
        return True

    def _cancel(self, failed_step: str) -> None:
        if self.run.status == "failed":
            return
        self.run.status = "failed"
        self.session.execute(update(WorkflowStepRow).where(
            WorkflowStepRow.run_id == self.run.id, WorkflowStepRow.status == "pending",
        ).values(status="skipped", finished_at=utcnow(), error={
            "reason": f"cancelled: step '{failed_step}' failed and the policy is fail_fast"}))

    def advance(self, resend: tuple[Send, ...] = ()) -> Advance:
        """End the run if no step is left pending or running; what to do after commit."""
        run = self.run
        if run.result is None and not self.session.scalar(
                select(func.count()).select_from(WorkflowStepRow).where(
                    WorkflowStepRow.run_id == run.id,
                    WorkflowStepRow.status.in_(("pending", "running")))):
            steps = _steps(self.session, run.id)
            run.status = "done" if all(s.status == "done" for s in steps) else "failed"
            run.finished_at = utcnow()
            run.result = _result(run, steps)
        return Advance(tuple(self.started), resend, cancelled=(
            run.policy == "fail_fast" and run.status == "failed" and run.result is None),
            result=None if run.result is None else dict(run.result))


def create_run(run_id: str, workflow: Workflow, levels: list[list[str]], plan: Plan
               ) -> Advance:
    """Record a run and its steps, and start the steps that depend on nothing."""
    level_of = {step_id: n for n, level in enumerate(levels) for step_id in level}
    with session_scope() as session:
        run = WorkflowRunRow(
            id=run_id, name=workflow.name, agent_id=workflow.agent_id, policy=workflow.policy,
            status="pending", definition=workflow.to_json_dict(), result=None,
            planned_tokens=plan.tokens, planned_nusd=plan.nusd, created_at=utcnow())
        session.add(run)
        session.flush()
        rows = [WorkflowStepRow(
            run_id=run_id, step_id=step.id, position=n, level=level_of[step.id],
            message_id=message_id(run_id, step.id), status="pending",
            depends_on=list(step.depends_on), input_tokens=0, output_tokens=0, cost_nusd=0,
            cached=False) for n, step in enumerate(workflow.steps)]
        session.add_all(rows)
        session.flush()
        change = _Change(session, run)
        change.start_roots(rows)
        return change.advance()


def _locked(session: Session, run_id: str, step_id: str
            ) -> tuple[WorkflowRunRow, WorkflowStepRow]:
    run = session.get(WorkflowRunRow, run_id, with_for_update=True)
    row = session.get(WorkflowStepRow, (run_id, step_id)) if run is not None else None
    if run is None or row is None:
        raise NotFound(f"workflow run '{run_id}' has no step '{step_id}'", kind="workflow_step",
                       id=f"{run_id}/{step_id}")
    return run, row


def _record(row: WorkflowStepRow, result: dict[str, Any]) -> None:
    row.finished_at = utcnow()
    error = result.get("error")
    if error is not None and error.get("code") == WorkflowCancelled.code:
        row.status, row.error = "skipped", {"reason": CANCELLED}
    elif error is not None:
        row.status, row.error = "failed", dict(error)
    else:
        row.status, row.output = "done", str(result["text"])
        row.endpoint_id, row.cached = result["endpoint_id"], bool(
            result.get("cached") or result.get("dedup"))
        row.input_tokens, row.output_tokens = result["input_tokens"], result["output_tokens"]
        row.cost_nusd = usd_to_nusd(Decimal(str(result["cost_usd"])))


def end_step(run_id: str, step_id: str, result: dict[str, Any]) -> Advance:
    """Record a step's answer (an AiResult dict) or its failure ({"error": {...}}; a
    WorkflowCancelled error skips it), and start or skip the steps it unblocks. Under
    fail_fast a failure cancels the run: every step not yet started is skipped."""
    with session_scope() as session:
        run, row = _locked(session, run_id, step_id)
        change = _Change(session, run)
        if row.status in ENDED:  # delivered again: see the module docstring
            return change.advance(tuple(
                Send(d, change.message(dependent)) for d in change.dependents[step_id]
                if (dependent := change.row(d)).status == "running"))
        _record(row, result)
        change.ended(row)
        return change.advance()


def _steps(session: Session, run_id: str) -> list[WorkflowStepRow]:
    return list(session.scalars(select(WorkflowStepRow).where(
        WorkflowStepRow.run_id == run_id).order_by(WorkflowStepRow.position)))


def _result(run: WorkflowRunRow, steps: list[WorkflowStepRow]) -> dict[str, Any]:
    return {
        "run_id": run.id, "name": run.name, "status": run.status, "policy": run.policy,
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
        run = session.get(WorkflowRunRow, run_id, with_for_update=True)
        if run is None or run.result is not None:
            return Advance(result=None if run is None else dict(run.result or {}))
        session.execute(update(WorkflowStepRow).where(
            WorkflowStepRow.run_id == run_id, WorkflowStepRow.status.in_(("pending", "running")),
        ).values(status="skipped", finished_at=utcnow(), error={"reason": reason}))
        run.status, run.finished_at = "failed", utcnow()
        session.flush()
        run.result = {**_result(run, _steps(session, run_id)), "error": reason}
        return Advance(result=dict(run.result))


def _step_view(s: WorkflowStepRow) -> dict[str, Any]:
    took = (s.finished_at - s.started_at).total_seconds() * 1000 if (
        s.started_at and s.finished_at) else None
    return {"step_id": s.step_id, "status": s.status, "level": s.level,
            "depends_on": s.depends_on, "endpoint_id": s.endpoint_id,
            "cost_usd": str(nusd_to_usd(s.cost_nusd)), "tokens": s.input_tokens + s.output_tokens,
            "cached": s.cached, "duration_ms": None if took is None else round(took, 1),
            "started_at": s.started_at.isoformat() if s.started_at else None,
            "finished_at": s.finished_at.isoformat() if s.finished_at else None,
            "error": s.error}


def run_view(run_id: str) -> dict[str, Any]:
    """A run and its steps as a JSON-safe dict (for `aimesh workflow status`)."""
    with session_scope() as session:
        run = session.get(WorkflowRunRow, run_id)
        if run is None:
            raise NotFound(f"no workflow run '{run_id}'; give the run id that `aimesh "
                           "workflow run` printed", kind="workflow_run", id=run_id)
        return {"run_id": run.id, "name": run.name, "agent_id": run.agent_id,
                "policy": run.policy, "status": run.status,
                "planned_usd": str(nusd_to_usd(run.planned_nusd)),
                "planned_tokens": run.planned_tokens,
                "created_at": run.created_at.isoformat(),
                "finished_at": run.finished_at.isoformat() if run.finished_at else None,
                "result": run.result, "steps": [_step_view(s) for s in _steps(session, run_id)]}
