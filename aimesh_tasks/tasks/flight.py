"""Ending a single-flight: answer every follower, or let them route again."""

from __future__ import annotations

from typing import Any

from celery import states

from aimesh_tasks.app import app
from aimesh_tasks.keys import ROUTE_QUEUE
from aimesh_tasks.messages import AiResult
from aimesh_tasks.pipeline.dedup import answer_for_follower, finish_flight


def end_flight(flight: dict[str, Any] | None, result: AiResult | None) -> int:
    """With an answer, store it as each follower's result; without one (the leader failed),
    send each follower back to routing, where the first leads again. How many followers."""
    if flight is None:
        return 0
    followers = finish_flight(flight, result)
    answer = result.to_json_dict() if result is not None else None
    for follower in followers:
        if answer is not None:
            app.backend.store_result(follower["task_id"],
                                     answer_for_follower(answer, follower), states.SUCCESS)
        else:
            app.signature("aimesh.route", args=(follower["message"],)).apply_async(
                task_id=follower["task_id"], queue=ROUTE_QUEUE)
    return len(followers)
