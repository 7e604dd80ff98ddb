"""Compile a validated workflow to one Celery canvas.

Steps are grouped by topological level (a step's level is one more than its deepest
dependency; see `dag.levels`). The canvas runs the levels in order:

- a level of one step is that step's task, chained to what follows;
- a level of several steps is a group, and the group with what follows is a chord:
  `chord(group(level k), rest)`; when the next level is also several steps, a small
  barrier task is the chord's body, so bodies are always a chain that starts with a task;
- the last element is the finish task, whose result is the run's result.

    chain of three      a -> b -> c          chain(a, b, c, finish)
    fan-out + gather    s1..s50 -> g         chord(group(s1..s50), chain(g, finish))
    diamond             a -> (b, c) -> d     chain(a, chord(group(b, c), chain(d, finish)))

A DAG that is not series-parallel (e.g. a->c, b->c, b->d) is compiled the same way,
level by level: chord(group(a, b), chain(barrier, chord(group(c, d), finish))). Every
dependency is respected, at the price that a step may wait for steps of the previous
level it does not depend on (d waits for a). Data does not flow through the canvas: each
step reads its dependencies' outputs from the run's state in the database, and every
task signature is immutable, so the canvas only orders the work.

Step task ids are `<run id>.<step id>`; the finish task's id is the run id, so
`AsyncResult(run_id)` resolves to the run's result. A step whose prompt quotes an answer
carries the step it is fed from (`dag.feeders`), so its message counts the hops.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from celery import chain, chord, group
from celery.canvas import Signature

from aimesh_tasks.keys import ROUTE_QUEUE
from aimesh_tasks.tasks.workflow import barrier, finish_run, run_crashed, run_step
from aimesh_tasks.workflows.dag import feeders
from aimesh_tasks.workflows.model import Workflow


def step_task_id(run_id: str, step_id: str) -> str:
    """The Celery task id of a step."""
    return f"{run_id}.{step_id}"


def _on_route_queue(sig: Signature, run_id: str) -> Signature:
    # Each task (not the chords: Celery links chord errbacks to bodies only) gets the
    # errback that ends the run if the task raises unexpectedly; a step replaced by its
    # message's route hands the errback on to the replacement.
    return sig.set(queue=ROUTE_QUEUE).on_error(run_crashed.s(run_id).set(queue=ROUTE_QUEUE))


def _step(run_id: str, step_id: str, definition: dict[str, Any], fed_from: str | None
          ) -> Signature:
    return _on_route_queue(run_step.si(run_id, step_id, definition, fed_from).set(
        task_id=step_task_id(run_id, step_id)), run_id)


def _one_step(shared: dict[str, Any], step_id: str) -> dict[str, Any]:
    # A step task carries the workflow with its own step only, not all of them.
    return {**shared, "steps": [s for s in shared["steps"] if s["id"] == step_id]}


def _prepend(level: list[Signature], rest: Signature, next_is_group: bool, run_id: str
             ) -> Signature:
    if len(level) == 1:
        return chain(level[0], rest)
    if next_is_group:
        rest = chain(_on_route_queue(barrier.si(), run_id), rest)
    return chord(group(level), rest)


def compile_workflow(run_id: str, workflow: Workflow, levels: Sequence[Sequence[str]]
                     ) -> Signature:
    """The canvas of a run: levels in order, chords where a level fans out, finish last."""
    shared = workflow.to_json_dict()
    fed_from = feeders(workflow.steps, levels)
    canvas = _on_route_queue(finish_run.si(run_id).set(task_id=run_id), run_id)
    next_is_group = False
    for level in reversed(levels):
        canvas = _prepend([_step(run_id, s, _one_step(shared, s), fed_from[s]) for s in level],
                          canvas, next_is_group, run_id)
        next_is_group = len(level) > 1
    return canvas
