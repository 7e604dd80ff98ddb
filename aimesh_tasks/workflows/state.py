"""Run and step state in the database: pending → running → done | failed | skipped.

Every change is one transaction that locks the run row first, then step rows, so a step
starting and a failing step cancelling the run (fail_fast) never interleave. Each change
is idempotent: a redelivered task finds its step already ended and changes nothing.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any, Literal

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from aimesh_tasks.db import WorkflowRunRow, WorkflowStepRow, session_scope
from aimesh_tasks.errors import NotFound
from aimesh_tasks.messages import utcnow
from aimesh_tasks.money import nusd_to_usd, usd_to_nusd
from aimesh_tasks.workflows.budget import Plan
from aimesh_tasks.workflows.model import Workflow
from aimesh_tasks.workflows.steps import message_id

ENDED = ("done", "failed", "skipped")


@dataclass(frozen=True)
class StepStart:
    """What a starting step does: run with its dependencies' outputs, or not run at all
    ('skipped' now, or 'ended' earlier: a redelivery)."""

    action: Literal["run", "skipped", "ended"]
    outcome: dict[str, Any] = field(default_factory=dict)
    outputs: dict[str, str] = field(default_factory=dict)


def create_run(run_id: str, workflow: Workflow, levels: Sequence[Sequence[str]],
               plan: Plan) -> None:
    """Record a run and all its steps as pending."""
    level_of = {step_id: n for n, level in enumerate(levels) for step_id in level}
    with session_scope() as session:
        session.add(WorkflowRunRow(
            id=run_id, name=workflow.name, agent_id=workflow.agent_id, policy=workflow.policy,
            status="pending", definition=workflow.to_json_dict(), result=None,
            planned_tokens=plan.tokens, planned_nusd=plan.nusd, created_at=utcnow()))
        session.flush()
        session.add_all(WorkflowStepRow(
            run_id=run_id, step_id=step.id, position=n, level=level_of[step.id],
            message_id=message_id(run_id, step.id), status="pending",
            depends_on=list(step.depends_on), input_tokens=0, output_tokens=0, cost_nusd=0,
            cached=False) for n, step in enumerate(workflow.steps))


def outcome(row: WorkflowStepRow) -> dict[str, Any]:
    """The small marker a step leaves in the canvas: its id, status and error if any."""
    return {"step_id": row.step_id, "status": row.status, "error": row.error}


def _locked(session: Session, run_id: str, step_id: str
            ) -> tuple[WorkflowRunRow, WorkflowStepRow]:
    run = session.get(WorkflowRunRow, run_id, with_for_update=True)
    row = session.get(WorkflowStepRow, (run_id, step_id), with_for_update=True)
    if run is None or row is None:
        raise NotFound(f"workflow run '{run_id}' has no step '{step_id}'", kind="workflow_step",
                       id=f"{run_id}/{step_id}")
    return run, row


def _skip(row: WorkflowStepRow, reason: str) -> StepStart:
    row.status, row.error, row.finished_at = "skipped", {"reason": reason}, utcnow()
    return StepStart("skipped", outcome(row))


def begin_step(run_id: str, step_id: str) -> StepStart:
    """Mark a step running and hand it its dependencies' outputs; or skip it, because the
    run was cancelled (fail_fast) or a dependency did not finish with an answer."""
    with session_scope() as session:
        run, row = _locked(session, run_id, step_id)
        if row.status in ENDED:
            return StepStart("ended", outcome(row))
        if run.policy == "fail_fast" and run.status == "failed":
            return _skip(row, "cancelled: another step failed and the policy is fail_fast")
        deps = list(session.scalars(select(WorkflowStepRow).where(
            WorkflowStepRow.run_id == run_id, WorkflowStepRow.step_id.in_(row.depends_on))))
        unfinished = sorted(d.step_id for d in deps if d.status != "done")
        if unfinished:
            return _skip(row, f"dependency {', '.join(unfinished)} did not finish")
        now = utcnow()
        row.status, row.started_at = "running", now
        if run.status == "pending":
            run.status, run.started_at = "running", now
        return StepStart("run", outputs={d.step_id: d.output or "" for d in deps})


def _cancel_pending(session: Session, run: WorkflowRunRow, failed_step: str) -> None:
    run.status = "failed"
    session.execute(update(WorkflowStepRow).where(
        WorkflowStepRow.run_id == run.id, WorkflowStepRow.status == "pending",
    ).values(status="skipped", finished_at=utcnow(), error={
        "reason": f"cancelled: step '{failed_step}' failed and the policy is fail_fast"}))


def end_step(run_id: str, step_id: str, result: dict[str, Any]) -> dict[str, Any]:
    """Record a step's answer (an AiResult dict) or its failure ({"error": {...}}); under
    fail_fast a failure cancels the run: every step not yet started is marked skipped."""
    with session_scope() as session:
        run, row = _locked(session, run_id, step_id)
        if row.status in ENDED:
            return outcome(row)
        row.finished_at = utcnow()
        if "error" in result:
            row.status, row.error = "failed", dict(result["error"])
            if run.policy == "fail_fast" and run.status != "failed":
                _cancel_pending(session, run, step_id)
        else:
            row.status, row.output = "done", str(result["text"])
            row.endpoint_id, row.cached = result["endpoint_id"], bool(
                result.get("cached") or result.get("dedup"))
            row.input_tokens, row.output_tokens = result["input_tokens"], result["output_tokens"]
            row.cost_nusd = usd_to_nusd(Decimal(str(result["cost_usd"])))
        return outcome(row)


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


def finish_run(run_id: str) -> dict[str, Any]:
    """End the run (done if every step answered, else failed) and store its result, a JSON
    dict of step outputs, failures and skipped steps. Idempotent."""
    with session_scope() as session:
        run = session.get(WorkflowRunRow, run_id, with_for_update=True)
        if run is None:
            raise NotFound(f"no workflow run '{run_id}'", kind="workflow_run", id=run_id)
        if run.result is not None:
            return dict(run.result)
        steps = _steps(session, run_id)
        run.status = "done" if all(s.status == "done" for s in steps) else "failed"
        run.finished_at = utcnow()
        run.result = _result(run, steps)
        return dict(run.result)


def fail_run(run_id: str, reason: str) -> None:
    """End a run whose canvas broke (an unexpected error): failed, unfinished steps skipped."""
    with session_scope() as session:
        run = session.get(WorkflowRunRow, run_id, with_for_update=True)
        if run is None or run.result is not None:
            return
        session.execute(update(WorkflowStepRow).where(
            WorkflowStepRow.run_id == run_id, WorkflowStepRow.status.in_(("pending", "running")),
        ).values(status="skipped", finished_at=utcnow(), error={"reason": reason}))
        run.status, run.finished_at = "failed", utcnow()
        session.flush()
        run.result = {**_result(run, _steps(session, run_id)), "error": reason}


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
