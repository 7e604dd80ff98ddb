"""Run and step state in the database, and the rule that starts a step when its own
dependencies are done.

    pending ──(every dependency done)──▶ running ──▶ done | failed
       └──(a dependency failed or was skipped; fail_fast cancelled the run)──▶ skipped

A running step has had its message sent: it is queued for routing or being answered.

**How a step starts.** Ending a step (`end_step`) is one transaction. It records the
step's answer or failure on the step's own row, locks the run row, and then counts, in
one aggregate over the run's step rows, for each step that depends on the ended one
whether it is still pending and how many of its dependencies are not done. A pending
step with none left is marked running and its message rendered from its dependencies'
outputs; a pending step that a failed or skipped dependency can never feed is skipped,
and its own dependents are counted in turn. The caller publishes the messages of the
steps it started once the transaction has committed (`Advance`, `tasks/workflow.py`).
A step therefore waits for its own dependencies only, in any DAG, series-parallel or not.

Why a count of the dependencies' rows, and not chords (a series-parallel DAG compiles
exactly to chains inside groups and chords, but any other DAG needs a second mechanism):
- one mechanism for every DAG;
- the count cannot drift from the run's state, because it is that state: the
  dependencies' own rows, read under the run's lock. A chord keeps its count in Redis
  (`celery-taskset-meta-*`), apart from the state in Postgres, where a Redis restart can
  lose it;
- atomic and idempotent by construction: a dependency counts as done only once the
  transaction that ends it commits, and that transaction runs once, since a completion
  delivered again finds its step ended and changes nothing: no dependency is counted
  twice, no step moves to running twice;
- fewer hops and a short lock: a step is its message's route and call, then the record
  that ends it and starts what follows (no step task, no barrier, no chord join); the run
  row is locked for the count and the commit only; and no migration.

A completion delivered again (its record task redelivered after the worker died between
commit and publish, or the callback of a duplicated call) starts nothing; it sends again
the messages of the dependents that are running and not ended (`Advance.resend`), since
the first delivery may have died before publishing them. A message sent twice is one
call and one charge on the message path (hand-off record, call lease, journal).

Locks: a transaction writes its own step's row, then locks the run row, and only then
writes other steps' rows. So every decision about the steps that follow (start, skip,
fail_fast's cancel, the end of the run) is made under the run's lock by one transaction
at a time, which sees every completion committed before it; and two records never wait
for each other (the only row one holds before the run's lock is its own running step,
which no other record writes).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from decimal import Decimal
from typing import Any, NamedTuple

from sqlalchemy import and_, func, select, update
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
UNFINISHED = ("pending", "running")
CANCELLED = "cancelled: another step failed and the policy is fail_fast"
Row = WorkflowStepRow


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


def _of(run_id: str, *step_ids: str) -> Any:
    return and_(Row.run_id == run_id, Row.step_id.in_(step_ids))


def _outcome(result: dict[str, Any]) -> dict[str, Any]:
    """The step row's columns for a step's answer or error."""
    error = result.get("error")
    if error is not None and error.get("code") == WorkflowCancelled.code:
        return {"status": "skipped", "error": {"reason": CANCELLED}}
    if error is not None:
        return {"status": "failed", "error": dict(error)}
    return {"status": "done", "output": str(result["text"]),
            "endpoint_id": result["endpoint_id"],
            "cached": bool(result.get("cached") or result.get("dedup")),
            "input_tokens": result["input_tokens"], "output_tokens": result["output_tokens"],
            "cost_nusd": usd_to_nusd(Decimal(str(result["cost_usd"])))}


class _Change:
    """One transaction's changes to a run whose row it has locked: steps end, and what
    depends on them starts or is skipped."""

    def __init__(self, session: Session, run: WorkflowRunRow) -> None:
        self.session, self.run = session, run
        steps = run.definition["steps"]
        self.definitions: dict[str, dict[str, Any]] = {s["id"]: s for s in steps}
        self.dependents = dependents(steps)
        self.started: list[Send] = []
        self.unfinished: int | None = None  # steps pending or running, once counted

    def _set(self, step_id: str, **values: Any) -> None:
        self.session.execute(update(Row).where(_of(self.run.id, step_id)).values(**values),
                             execution_options={"synchronize_session": False})

    def _end(self, step_id: str, status: str, **values: Any) -> None:
        self._set(step_id, status=status, finished_at=utcnow(), **values)
        if self.unfinished is not None:
            self.unfinished -= 1

    def _tally(self, step_ids: list[str]) -> dict[str, tuple[bool, int]]:
        """For each step: is it pending, how many of its dependencies are not done; one
        aggregate, which also counts the run's unfinished steps the first time."""
        counts = [func.count().filter(Row.status.in_(UNFINISHED))]
        for step_id in step_ids:
            deps = self.definitions[step_id].get("depends_on") or []
            counts += [func.count().filter(and_(Row.step_id == step_id,
                                                Row.status == "pending")),
                       func.count().filter(and_(Row.step_id.in_(deps), Row.status != "done"))]
        row = self.session.execute(select(*counts).where(Row.run_id == self.run.id)).one()
        if self.unfinished is None:
            self.unfinished = int(row[0])
        return {s: (bool(row[1 + 2 * n]), int(row[2 + 2 * n]))
                for n, s in enumerate(step_ids)}

    def ended(self, ends: list[tuple[str, str]]) -> None:
        """These steps (id, status) just ended: apply the policy, then start or skip
        what depends on them, transitively."""
        while ends:
            step_id, status = ends.pop()
            if status == "failed" and self.run.policy == "fail_fast":
                self._cancel(step_id)
            following = self.dependents[step_id]
            if not following and self.unfinished is not None:
                continue
            for dependent, (pending, undone) in self._tally(following).items():
                if pending and status != "done":
                    self._end(dependent, "skipped", error={
                        "reason": f"dependency {step_id} did not finish"})
                    ends.append((dependent, "skipped"))
                elif pending and undone == 0 and not self._start(dependent):
                    ends.append((dependent, "failed"))

    def message(self, step_id: str) -> AiMessage:
        """The step's message, rendered from its dependencies' outputs (all done)."""
        step = Step.model_validate(self.definitions[step_id])
        outputs = {row.step_id: row.output or "" for row in self.session.execute(
            select(Row.step_id, Row.output).where(_of(self.run.id, *step.depends_on)))}
        return step_message(self.run.agent_id, step, self.run.id, outputs)

    def _start(self, step_id: str) -> bool:
        """Mark the step running and queue its message; False if the message is invalid
        (e.g. the rendered prompt is over the payload cap): the step then failed."""
        try:
            message = self.message(step_id)
        except InvalidMessage as exc:
            self._end(step_id, "failed", error=exc.to_dict())
            return False
        self._set(step_id, status="running", started_at=utcnow())
        self.started.append(Send(step_id, message))
        return True

    def _cancel(self, failed_step: str) -> None:
        if self.run.status == "failed":
            return
        self.run.status = "failed"
        skipped = self.session.execute(update(Row).where(
            Row.run_id == self.run.id, Row.status == "pending").values(
            status="skipped", finished_at=utcnow(), error={
                "reason": f"cancelled: step '{failed_step}' failed and the policy is "
                          "fail_fast"}), execution_options={"synchronize_session": False})
        if self.unfinished is not None:
            self.unfinished -= skipped.rowcount  # type: ignore[attr-defined]

    def advance(self, resend: tuple[Send, ...] = ()) -> Advance:
        """End the run if no step is left pending or running; what to do after commit."""
        run = self.run
        if self.unfinished is None:
            self._tally([])
        if run.result is None and self.unfinished == 0:
            steps = _steps(self.session, run.id)
            run.status = "done" if all(s.status == "done" for s in steps) else "failed"
            run.finished_at = utcnow()
            run.result = _result(run, steps)
        return Advance(tuple(self.started), resend, cancelled=(
            run.policy == "fail_fast" and run.status == "failed" and run.result is None),
            result=None if run.result is None else dict(run.result))


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
                started_at=now if step.id in sent else None,
                finished_at=now if step.id in errors else None,
                input_tokens=0, output_tokens=0, cost_nusd=0, cached=False)
            for n, step in enumerate(workflow.steps)]
    return rows, sends


def create_run(run_id: str, workflow: Workflow, levels: list[list[str]], plan: Plan
               ) -> Advance:
    """Record a run and its steps, the steps that depend on nothing already started."""
    rows, sends = _new_rows(run_id, workflow, levels)
    with session_scope() as session:
        run = WorkflowRunRow(
            id=run_id, name=workflow.name, agent_id=workflow.agent_id, policy=workflow.policy,
            status="running", definition=workflow.to_json_dict(), result=None,
            planned_tokens=plan.tokens, planned_nusd=plan.nusd, created_at=utcnow(),
            started_at=utcnow())
        session.add(run)
        session.flush()
        session.add_all(rows)
        session.flush()
        change = _Change(session, run)
        change.started = list(sends)
        change.ended([(r.step_id, "failed") for r in rows if r.status == "failed"])
        return change.advance()


def _again(session: Session, run_id: str, step_id: str) -> Advance:
    """A completion of a step that has already ended (see the module docstring)."""
    run = session.get(WorkflowRunRow, run_id)
    if run is None or session.scalar(select(Row.status).where(_of(run_id, step_id))) is None:
        raise NotFound(f"workflow run '{run_id}' has no step '{step_id}'", kind="workflow_step",
                       id=f"{run_id}/{step_id}")
    if run.result is not None:
        return Advance(result=dict(run.result))
    change = _Change(session, run)
    running = session.scalars(select(Row.step_id).where(
        _of(run_id, *change.dependents[step_id]), Row.status == "running"))
    return Advance(resend=tuple(Send(d, change.message(d)) for d in running),
                   cancelled=run.policy == "fail_fast" and run.status == "failed")


def end_step(run_id: str, step_id: str, result: dict[str, Any]) -> Advance:
    """Record a step's answer (an AiResult dict) or its failure ({"error": {...}}; a
    WorkflowCancelled error skips it), and start or skip the steps it unblocks. Under
    fail_fast a failure cancels the run: every step not yet started is skipped."""
    values = _outcome(result)
    with session_scope() as session:
        ended = session.execute(update(Row).where(
            _of(run_id, step_id), Row.status.in_(UNFINISHED)).values(
            finished_at=utcnow(), **values).returning(Row.step_id),
            execution_options={"synchronize_session": False}).first()
        if ended is None:
            return _again(session, run_id, step_id)
        run = session.get(WorkflowRunRow, run_id, with_for_update=True)
        assert run is not None  # the step row's foreign key
        change = _Change(session, run)
        change.ended([(step_id, values["status"])])
        return change.advance()


def _steps(session: Session, run_id: str) -> list[Row]:
    return list(session.scalars(select(Row).where(Row.run_id == run_id)
                                .order_by(Row.position)))


def _result(run: WorkflowRunRow, steps: Iterable[Row]) -> dict[str, Any]:
    steps = list(steps)
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
        run = session.get(WorkflowRunRow, run_id)
        if run is None or run.result is not None:
            return Advance(result=None if run is None else dict(run.result or {}))
        session.execute(update(Row).where(Row.run_id == run_id, Row.status.in_(UNFINISHED))
                        .values(status="skipped", finished_at=utcnow(),
                                error={"reason": reason}),
                        execution_options={"synchronize_session": False})
        session.refresh(run, with_for_update=True)  # steps first, then the run: see Locks
        if run.result is not None:
            return Advance(result=dict(run.result))
        run.status, run.finished_at = "failed", utcnow()
        run.result = {**_result(run, _steps(session, run_id)), "error": reason}
        return Advance(result=dict(run.result))
