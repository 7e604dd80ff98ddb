"""Ending a single-flight: answer every follower, or let them route again."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from celery import states

from aimesh_tasks.app import app
from aimesh_tasks.dedup.cache import adopt_orphan, orphaned_flights
from aimesh_tasks.keys import ROUTE_QUEUE
from aimesh_tasks.messages import AiResult
from aimesh_tasks.pipeline.dedup import answer_for_follower, queue_finish_flight
from aimesh_tasks.redis_batch import Batch
from aimesh_tasks.settings import get_settings


def _route_again(follower: dict[str, Any]) -> None:
    """Send a waiting follower's message back to routing under its own task id."""
    app.signature("aimesh.route", args=(follower["message"],)).apply_async(
        task_id=follower["task_id"], queue=ROUTE_QUEUE)


def queue_end_flight(batch: Batch, flight: dict[str, Any] | None, result: AiResult | None
                     ) -> Callable[[], int]:
    """Queue ending the flight; call the returned function once the batch is sent. With an
    answer, it stores that answer as each follower's result; without one (the leader
    failed), it sends each follower back to routing, where the first leads again. It
    returns how many followers there were."""
    if flight is None:
        return lambda: 0
    finished = queue_finish_flight(batch, flight, result)

    def answer_followers() -> int:
        followers = finished()
        answer = result.to_json_dict() if result is not None else None
        for follower in followers:
            if answer is not None:
                app.backend.store_result(follower["task_id"],
                                         answer_for_follower(answer, follower), states.SUCCESS)
            else:
                _route_again(follower)
        return len(followers)

    return answer_followers


def end_flight(flight: dict[str, Any] | None, result: AiResult | None) -> int:
    """End the flight on its own round trip (see queue_end_flight); how many followers."""
    batch = Batch()
    answer_followers = queue_end_flight(batch, flight, result)
    batch.send()
    return answer_followers()


def adopt_orphans() -> int:
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
        _route_again(follower)
        adopted += 1
    return adopted
