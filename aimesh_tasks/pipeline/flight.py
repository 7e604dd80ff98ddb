"""Ending a single-flight: answer every follower, or let them route again.

The Celery app is passed in (a task's `self.app`, a bootstep's `parent.app`), never
imported: this module sits below the tasks and the app.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from celery import states

from aimesh_tasks.dedup.cache import adopt_orphan, orphaned_flights
from aimesh_tasks.envelope import Flight
from aimesh_tasks.errors import DeadlineExceeded
from aimesh_tasks.keys import ROUTE_QUEUE
from aimesh_tasks.messages import AiMessage, AiResult
from aimesh_tasks.pipeline.dedup import answer_for_follower, queue_finish_flight
from aimesh_tasks.pipeline.reprs import message_reprs
from aimesh_tasks.redis_batch import Batch
from aimesh_tasks.settings import get_settings


def route_again(app: Any, message: dict[str, Any], task_id: str) -> None:
    """Send a message back to routing under its own task id. It was validated when it
    was accepted, so it is published as it is (a deadline that passed since is answered
    with DeadlineExceeded by the routing task, not refused here)."""
    shown = message_reprs(AiMessage.decode(message))
    app.send_task("aimesh.route", args=(message,), task_id=task_id, queue=ROUTE_QUEUE,
                  **shown)


def deadline_exceeded(message: AiMessage, where: str) -> DeadlineExceeded:
    """The error of a message whose deadline passed `where` (e.g. 'in the queue')."""
    deadline = message.deadline.isoformat() if message.deadline else None
    return DeadlineExceeded(
        f"message '{message.id}': its deadline {deadline} passed {where}; give a later "
        "deadline or none", message_id=message.id, agent_id=message.agent_id,
        deadline=deadline)


def _answer(app: Any, follower: dict[str, Any], answer: dict[str, Any] | None) -> None:
    message = AiMessage.decode(follower["message"])
    task_id = follower["task_id"]
    if answer is None:
        route_again(app, follower["message"], task_id)
    elif message.expired():
        error = deadline_exceeded(message, "while it waited for an identical message")
        app.backend.store_result(task_id, error, states.FAILURE)
    else:
        app.backend.store_result(task_id, answer_for_follower(answer, message),
                                 states.SUCCESS)


def queue_end_flight(app: Any, batch: Batch, flight: Flight | None,
                     result: AiResult | None) -> Callable[[], int]:
    """Queue ending the flight; call the returned function once the batch is sent. With an
    answer, it stores that answer as each follower's result (a follower whose deadline
    passed meanwhile gets DeadlineExceeded); without one (the leader failed), it sends
    each follower back to routing, where the first leads again. It returns how many
    followers there were."""
    if flight is None:
        return lambda: 0
    finished = queue_finish_flight(batch, flight, result)

    def answer_followers() -> int:
        followers = finished()
        answer = result.to_json_dict() if result is not None else None
        for follower in followers:
            _answer(app, follower, answer)
        return len(followers)

    return answer_followers


def end_flight(app: Any, flight: Flight | None, result: AiResult | None) -> int:
    """End the flight on its own round trip (see queue_end_flight); how many followers."""
    batch = Batch()
    answer_followers = queue_end_flight(app, batch, flight, result)
    batch.send()
    return answer_followers()


def adopt_orphans(app: Any) -> int:
    """Give every flight whose leader's lease ran out (its worker died and the message was
    not redelivered in time) a new leader: its first follower, routed again under the new
    fencing token; the remaining followers stay and are answered by it. How many."""
    lease_s = get_settings().single_flight_lease_s
    adopted = 0
    for request_key in orphaned_flights():
        taken = adopt_orphan(request_key, lease_s)
        if taken is None:
            continue
        follower, _token = taken
        route_again(app, follower["message"], follower["task_id"])
        adopted += 1
    return adopted
