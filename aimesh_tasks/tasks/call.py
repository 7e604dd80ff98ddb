"""`aimesh.call`: call the endpoint whose queue this is; fall back to the next on failure."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from celery import Task

from aimesh_tasks import events
from aimesh_tasks.app import app
from aimesh_tasks.errors import AllEndpointsFailed
from aimesh_tasks.messages import AiMessage, Attempt, utcnow
from aimesh_tasks.pipeline.call import attempt_call, build_result, endpoint_from_args


@app.task(name="aimesh.call", bind=True)
def call_endpoint(
    self: Task,
    message: dict[str, Any],
    route: list[dict[str, Any]],
    attempts: list[dict[str, Any]] | None = None,
    started_at: str | None = None,
) -> dict[str, Any]:
    """Call route[0]; on a retryable failure, replace this task by a call to route[1]."""
    parsed = AiMessage.model_validate(message)
    endpoint = endpoint_from_args(route[0])
    past = [Attempt.model_validate(a) for a in attempts or []]
    first_started = utcnow() if started_at is None else datetime.fromisoformat(started_at)
    attempt, completion, error = attempt_call(parsed, endpoint, f"{parsed.id}:{len(past)}")
    past.append(attempt)
    if completion is not None:
        result = build_result(parsed, endpoint, completion, past, first_started)
        events.message_completed.send(sender=call_endpoint, message=parsed, result=result)
        return result.to_json_dict()
    assert error is not None
    if error.retryable and len(route) > 1:
        fallback = call_endpoint.signature(
            (message, route[1:], [a.model_dump(mode="json") for a in past],
             first_started.isoformat()),
            queue=endpoint_from_args(route[1]).queue,
            expires=parsed.deadline,
        )
        raise self.replace(fallback)
    final = error if len(past) == 1 else AllEndpointsFailed(
        f"all {len(past)} endpoints failed for message '{parsed.id}'; last: {error.message}",
        endpoint_id=endpoint.id,
        attempts=[a.model_dump(mode="json") for a in past],
        retryable=False,
    )
    events.message_failed.send(sender=call_endpoint, message=parsed, error=final)
    raise final

