"""Workflow tasks: a step (render, then become a routed message), its record, the finish.

A step task never raises for an expected failure: it returns a small outcome marker
({"step_id", "status", "error"}), so a failed step cannot fail the chord it belongs to,
and the steps after it decide from the recorded state whether to run or be skipped.
"""

from __future__ import annotations

from typing import Any

from celery import Task, chain

from aimesh_tasks.app import app
from aimesh_tasks.errors import InvalidMessage
from aimesh_tasks.tasks.route import route_message
from aimesh_tasks.workflows import state
from aimesh_tasks.workflows.model import Workflow
from aimesh_tasks.workflows.steps import step_message

STEP = "aimesh.workflow.step"
RECORD = "aimesh.workflow.record"
BARRIER = "aimesh.workflow.barrier"
FINISH = "aimesh.workflow.finish"
FAILED = "aimesh.workflow.failed"


@app.task(name=STEP, bind=True)
def run_step(self: Task, run_id: str, step_id: str, definition: dict[str, Any],
             fed_from: str | None = None) -> Any:
    """Skip the step (cancelled run, or a dependency without an answer), or render its
    message from its dependencies' outputs and replace this task by that message's route,
    followed by recording its answer. `fed_from`: the quoted step whose message is this
    message's parent (its hops are counted from there)."""
    started = state.begin_step(run_id, step_id)
    if started.action != "run":
        return started.outcome
    workflow = Workflow.model_validate(definition)
    try:
        message = step_message(workflow, workflow.step(step_id), run_id, started.outputs,
                               fed_from)
    except InvalidMessage as exc:
        return state.end_step(run_id, step_id, {"error": exc.to_dict()})
    raise self.replace(chain(
        route_message.signature((message.to_json_dict(),), {"errors_as_results": True}),
        record_step.signature((run_id, step_id)),
    ))


@app.task(name=RECORD)
def record_step(result: dict[str, Any], run_id: str, step_id: str) -> dict[str, Any]:
    """Record a step's answer or failure; the step's outcome marker."""
    return state.end_step(run_id, step_id, result)


@app.task(name=BARRIER)
def barrier() -> None:
    """Joins one level of parallel steps before the next level starts (a chord body)."""


@app.task(name=FINISH)
def finish_run(run_id: str) -> dict[str, Any]:
    """End the run; its result: the step outputs, the failures and the skipped steps."""
    return state.finish_run(run_id)


@app.task(name=FAILED)
def run_crashed(request: Any, exc: BaseException, traceback: Any, run_id: str) -> None:
    """Errback: a task of the run raised unexpectedly, so the canvas cannot finish it."""
    state.fail_run(run_id, f"{type(exc).__name__}: {exc}"[:500])
