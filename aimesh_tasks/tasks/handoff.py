"""Handing a message on to its next task under the same task id.

Celery's `Task.replace` ends the task by raising `Ignore`, and the worker then builds an
`ExceptionInfo` for it; on Python 3.11 billiard copies the code positions of every frame
on the stack, which cost 2.3 ms of CPU per replace in a router worker here (cProfile,
1,100 messages). A message outside a canvas needs nothing else that replace does (it hands
over chord, group and callbacks): the next task is published under this task's id, and
this task's own return value is not stored (`request.ignore_result`, which the result
backend reads when it stores), so the producer's AsyncResult resolves to the next task's
result. A task with callbacks (a workflow step's message: its record is a link) hands them
on the same way replace does, to the next task, and they do not run for its own return.
A task inside a chord, group or chain is still replaced, so they see one result.

A callback whose task can run inline (it has `run_inline`: a workflow step's record) is
run in the process that has the result, instead of being published for another worker:
one hop less on the message's way. If it raises, it is published as usual after all, and
runs as a task of its own, with its retries.
"""

from __future__ import annotations

import logging
from typing import Any

from celery import Signature, Task, signature

logger = logging.getLogger(__name__)


def in_canvas(request: Any) -> bool:
    """Part of a chain, group or chord, or carrying callbacks: its result must come from
    its own return (or Celery's replace), never from another task writing to its id."""
    return bool(request.chord or request.callbacks or request.errbacks or request.chain
                or request.group)


def hand_off(task: Task, next_task: Signature) -> None:
    """Continue the message in `next_task` under this task's id, with this task's
    callbacks and errbacks; this task's own return value is then discarded. Inside a
    chord, group or chain this is Celery's replace (which raises)."""
    request = task.request
    if request.chord or request.chain or request.group:
        raise task.replace(next_task)
    for callback in request.callbacks or ():
        next_task.link(signature(callback, app=task.app))
    for errback in request.errbacks or ():
        next_task.link_error(signature(errback, app=task.app))
    next_task.apply_async(task_id=request.id, root_id=request.root_id,
                          parent_id=request.parent_id)
    request.callbacks = request.errbacks = None  # the next task runs them, not this one
    discard_result(task)


def discard_result(task: Task) -> None:
    """Store nothing for this task when it returns: another task writes its result (the
    next hop, or a single-flight leader answering this follower)."""
    task.request.ignore_result = True


def run_inline_callbacks(task: Task, result: Any) -> None:
    """Run here, with `result`, the callbacks of `task` whose task has `run_inline`; the
    others, and one that raised, stay for Celery to publish when `task` returns."""
    left = []
    for callback in task.request.callbacks or ():
        sig = signature(callback, app=task.app)
        run_inline = getattr(task.app.tasks.get(sig.task), "run_inline", None)
        if run_inline is None:
            left.append(callback)
            continue
        try:
            run_inline(result, *sig.args, **sig.kwargs)
        except Exception:
            logger.warning("callback %s of task %s failed inline; it is sent as a task",
                           sig.task, task.request.id, exc_info=True)
            left.append(callback)
    task.request.callbacks = left or None
