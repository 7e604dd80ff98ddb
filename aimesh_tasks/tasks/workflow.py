"""Workflow tasks: a step's record (which starts what it unblocks) and the errback.

A step is its message's route and call, with the record as the message's callback (a
Celery link, handed on from hop to hop and run inline by the hop that has the answer:
tasks/handoff.py). The message asks for errors as results, so a refused or failed step
is recorded like an answer, and the record decides from the run's state what follows
(`workflows/state.py`). Only an unexpected error (a bug, an outage past the retries)
reaches the errback, which has the run ended as failed.
"""

from __future__ import annotations

from typing import Any

from celery import Task, states

from aimesh_tasks.app import app
from aimesh_tasks.failpoints import failpoint
from aimesh_tasks.keys import ROUTE_QUEUE
from aimesh_tasks.outages import TRANSIENT
from aimesh_tasks.tasks.route import route_message
from aimesh_tasks.tasks.shell import retry_transient
from aimesh_tasks.workflows import cancellation, state

RECORD = "aimesh.workflow.record"
FAILED = "aimesh.workflow.failed"
END_FAILED = "aimesh.workflow.end_failed"


def send_step(run_id: str, send: state.Send, producer: Any = None) -> None:
    """Publish a started step's message (validated when it was rendered) for routing,
    its answer or error recorded by `record_step`."""
    crashed = run_crashed.s(run_id).set(queue=ROUTE_QUEUE)
    record = record_step.s(run_id, send.step_id).set(queue=ROUTE_QUEUE).on_error(crashed)
    route_message.apply_async((send.message,), {"errors_as_results": True},
                              task_id=send.message.id, link=record, link_error=crashed,
                              producer=producer)


def dispatch(run_id: str, advance: state.Advance) -> None:
    """Do what a committed change of the run asks for: refuse its queued steps (it was
    cancelled), send the started steps' messages, store its result (it ended)."""
    if advance.cancelled:
        cancellation.cancel(run_id)
    sends = advance.start + advance.resend
    if sends:
        with app.producer_or_acquire() as producer:
            for send in sends:
                send_step(run_id, send, producer)
    if advance.result is not None:
        # The run's AsyncResult (its id is the run id) resolves to this.
        app.backend.store_result(run_id, advance.result, states.SUCCESS)


def record(result: dict[str, Any], run_id: str, step_id: str) -> None:
    """Record a step's answer or failure; send what it started; end the run if it was the
    last. Safe to run again (state.end_step is idempotent)."""
    advance = state.end_step(run_id, step_id, result)
    # Committed, nothing sent yet: a worker that dies here is the case resend is for.
    failpoint("after_record", str(result.get("agent_id", "")))
    dispatch(run_id, advance)


class RecordTask(Task):  # type: ignore[misc]
    """The record runs inline where the step's answer is (tasks/handoff.py), and as a
    task of its own, with retries, when that failed."""

    def run_inline(self, result: dict[str, Any], run_id: str, step_id: str) -> None:
        record(result, run_id, step_id)


@app.task(name=RECORD, bind=True, base=RecordTask, ignore_result=True)
def record_step(self: Task, result: dict[str, Any], run_id: str, step_id: str) -> None:
    """`record`, as a task: a transient outage retries."""
    try:
        record(result, run_id, step_id)
    except TRANSIENT as exc:
        retry_transient(self, exc, "the run stays unfinished")


@app.task(name=FAILED)
def run_crashed(request: Any, exc: BaseException, traceback: Any, run_id: str) -> None:
    """Errback (Celery calls it in the failed task's worker): a task of the run raised
    unexpectedly, so the run cannot go on; `end_failed_run` ends it."""
    end_failed_run.apply_async((run_id, f"{type(exc).__name__}: {exc}"[:500]),
                               queue=ROUTE_QUEUE)


@app.task(name=END_FAILED, bind=True, ignore_result=True)
def end_failed_run(self: Task, run_id: str, reason: str) -> None:
    """End a run as failed, its unfinished steps skipped; a transient outage (or a lock
    conflict with a step's record) retries."""
    try:
        dispatch(run_id, state.fail_run(run_id, reason))
    except TRANSIENT as exc:
        retry_transient(self, exc, "the run stays unfinished")
