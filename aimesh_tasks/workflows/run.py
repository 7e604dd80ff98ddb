"""`submit_workflow()`: validate, check the budget, record the run, send its first steps."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any, NamedTuple

import kombu.exceptions
from celery.result import AsyncResult

from aimesh_tasks.app import app
from aimesh_tasks.embedded import ensure_embedded_worker
from aimesh_tasks.errors import BudgetExceeded
from aimesh_tasks.governance.audit import audit
from aimesh_tasks.registry.endpoints import list_endpoints
from aimesh_tasks.settings import get_settings
from aimesh_tasks.tasks.workflow import dispatch
from aimesh_tasks.workflows import state
from aimesh_tasks.workflows.budget import check_plan, plan_run
from aimesh_tasks.workflows.dag import validate_workflow
from aimesh_tasks.workflows.model import Workflow, load_workflow, parse_workflow


class Submitted(NamedTuple):
    """A queued run: its id and the AsyncResult that resolves to the run's result dict."""

    run_id: str
    result: AsyncResult


def submit_workflow(workflow: Workflow | dict[str, Any] | str | Path,
                    *, run_id: str | None = None) -> Submitted:
    """Queue one run of a workflow (a Workflow, a dict, or a .yaml/.json file path).

    Refused before anything is queued or recorded: InvalidInput for a bad definition or
    graph (naming the step), NoEndpointAvailable for a step no endpoint serves, and
    BudgetExceeded when the run's worst case does not fit the agent's budget or the cap.
    """
    parsed = (load_workflow(workflow) if isinstance(workflow, str | Path)
              else parse_workflow(workflow))
    levels = validate_workflow(parsed, get_settings().workflow_max_steps)
    run_id = run_id or uuid.uuid4().hex
    plan = plan_run(parsed, tuple(list_endpoints()))
    try:
        check_plan(parsed, plan)
    except BudgetExceeded as exc:
        audit("denied", message_id=run_id, agent_id=parsed.agent_id, tokens=plan.tokens,
              cost_nusd=plan.nusd, reason=exc.message[:512],
              detail={"workflow": parsed.name, "reason": exc.fields.get("reason")})
        raise
    started = state.create_run(run_id, parsed, levels, plan)
    ensure_embedded_worker()
    try:
        dispatch(run_id, started)
    except kombu.exceptions.OperationalError as exc:  # past the publish retries: the caller
        state.fail_run(run_id, f"its first steps could not be queued: {exc}")  # gets the error
        raise
    return Submitted(run_id, AsyncResult(run_id, app=app))
