"""Dead-letter a task message and give its producer a terminal result to read."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

from celery import Celery, states

from aimesh_tasks.delivery import dead_letters
from aimesh_tasks.errors import UndeliverableMessage
from aimesh_tasks.pipeline.race import bury_hedge

logger = logging.getLogger(__name__)


def undeliverable(entry: dead_letters.DeadLetter) -> UndeliverableMessage:
    """The error a producer waiting on the dead letter's task id gets."""
    return UndeliverableMessage(
        f"message '{entry['task_id']}' could not be run from queue '{entry['queue']}' "
        f"({entry['reason']}: {entry['detail']}); it is dead letter {entry['id']}, see "
        f"`aimesh dead show {entry['id']}`",
        queue=entry["queue"], reason=entry["reason"], dead_letter_id=entry["id"],
        task_id=entry["task_id"], detail=entry["detail"],
    )


def store_failure(app: Celery, entry: dead_letters.DeadLetter, request: Any) -> None:
    """Store UndeliverableMessage as the result of the entry's task, unless that task id
    already has a final result (a copy of a finished message must not overwrite it). A
    hedge's task also ends its lane of the message's race (pipeline/race.py)."""
    task_id = entry["task_id"]
    if not task_id or app.backend.get_state(task_id) in states.READY_STATES:
        return
    bury_hedge(app, task_id)
    app.backend.mark_as_failure(task_id, undeliverable(entry), request=request)


def bury_task(app: Celery, request: Any, *, queue: str, raw: bytes, reason: str,
              detail: str, task_id: str | None, task: str | None,
              history: Iterable[dict[str, Any]] = ()) -> bool:
    """Dead-letter a task message and fail its task id; False (and one log line) when the
    store cannot be reached, so that the caller falls back to Celery's own handling."""
    try:
        entry = dead_letters.add(queue, raw, reason, detail, task_id=task_id, task=task,
                                 history=history)
        store_failure(app, entry, request)
    except Exception:  # fail open: without the store, the message is handled as before
        logger.exception("dead_letter.store_failed", extra={"queue": queue, "reason": reason,
                                                             "task_id": task_id})
        return False
    return True
