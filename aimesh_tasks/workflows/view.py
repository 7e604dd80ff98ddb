"""A run and its steps as JSON, for `aimesh workflow status` and `--wait`."""

from __future__ import annotations

from typing import Any

from sqlalchemy import select

from aimesh_tasks.db import WorkflowRunRow, WorkflowStepRow, session_scope
from aimesh_tasks.errors import NotFound
from aimesh_tasks.money import nusd_to_usd


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
    """A run and its steps as a JSON-safe dict; a step's duration runs from when its
    message was sent (its dependencies done) to when its answer was recorded."""
    with session_scope() as session:
        run = session.get(WorkflowRunRow, run_id)
        if run is None:
            raise NotFound(f"no workflow run '{run_id}'; give the run id that `aimesh "
                           "workflow run` printed", kind="workflow_run", id=run_id)
        steps = session.scalars(select(WorkflowStepRow).where(
            WorkflowStepRow.run_id == run_id).order_by(WorkflowStepRow.position))
        return {"run_id": run.id, "name": run.name, "agent_id": run.agent_id,
                "policy": run.policy, "status": run.status,
                "planned_usd": str(nusd_to_usd(run.planned_nusd)),
                "planned_tokens": run.planned_tokens,
                "created_at": run.created_at.isoformat(),
                "finished_at": run.finished_at.isoformat() if run.finished_at else None,
                "result": run.result, "steps": [_step_view(s) for s in steps]}
