"""`aimesh.route`: pick the endpoint for a message, reserve its budget, hand it to the
endpoint's queue."""

from __future__ import annotations

from typing import Any

from celery import Task
from celery.exceptions import Ignore
from celery.result import AsyncResult

from aimesh_tasks import events
from aimesh_tasks.app import app
from aimesh_tasks.errors import AimeshError, InvalidMessage
from aimesh_tasks.governance.audit import audit
from aimesh_tasks.keys import ROUTE_QUEUE
from aimesh_tasks.messages import AiMessage, AiResult, parse_message
from aimesh_tasks.pipeline.call import endpoint_to_args
from aimesh_tasks.pipeline.dedup import answer_from_cache, join_flight, semantic_answer
from aimesh_tasks.pipeline.route import admit, plan_route
from aimesh_tasks.tasks.call import call_endpoint, error_result
from aimesh_tasks.tasks.flight import end_flight


def validate_or_audit(data: Any) -> AiMessage:
    """Parse a message; an invalid one is audited as 'rejected' before the error is raised."""
    try:
        return parse_message(data)
    except InvalidMessage as exc:
        raw = data if isinstance(data, dict) else {}
        audit("rejected", message_id=str(raw.get("id", "")), agent_id=str(raw.get("agent_id", "")),
              reason=exc.message, detail={"errors": exc.fields.get("errors", [])})
        raise


DEDUP_OUTCOMES = {"hit": "hit", "follow": "join", "lead": "miss"}


class RouteTask(Task):  # type: ignore[misc]
    """Validates the message before anything is queued; the task id is the message id."""

    def apply_async(
        self, args: Any = None, kwargs: Any = None, **options: Any
    ) -> AsyncResult:
        """Validate the message, then publish it with its deadline as the Celery expiry."""
        message = validate_or_audit((kwargs or {}).get("message") or (args or [None])[0])
        options.setdefault("task_id", message.id)
        options.setdefault("queue", ROUTE_QUEUE)
        if message.deadline is not None:
            options.setdefault("expires", message.deadline)
        extra = {k: v for k, v in (kwargs or {}).items() if k != "message"} or None
        return super().apply_async((message.to_json_dict(),), extra, **options)


def _in_canvas(request: Any) -> bool:
    """A task that is part of a chain, group or chord: its result must come from its own
    return, so it may not wait as a single-flight follower (whose result the leader writes
    straight into the result backend, bypassing callbacks and chord counting)."""
    return bool(request.chord or request.callbacks or request.chain or request.group)


# AimeshError outcomes (budget refused, no endpoint, provider failed) are expected: Celery
# logs them as one line, without a traceback.
@app.task(name="aimesh.route", base=RouteTask, bind=True, throws=(AimeshError,))
def route_message(self: Task, message: dict[str, Any], errors_as_results: bool = False) -> Any:
    """Answer from cache, join an identical message in flight, or route the message and
    replace this task by the call on the winner's queue. With errors_as_results (workflow
    steps), a refusal or failure is returned as {"error": {...}} instead of raised."""
    parsed = AiMessage.model_validate(message)
    joined, flight = join_flight(parsed, self.request.id,
                                 may_follow=not _in_canvas(self.request))
    events.message_deduplicated.send(
        sender=route_message, message=parsed, result=joined.cached,
        outcome="bypass" if parsed.no_cache else DEDUP_OUTCOMES[joined.decision])
    if joined.decision == "hit":
        return answer_from_cache(parsed, joined.cached or {})
    if joined.decision == "follow":
        raise Ignore()  # the leader stores this task's result when it has the answer
    equivalent = semantic_answer(parsed, flight)
    if equivalent is not None:
        end_flight(flight, AiResult.model_validate(equivalent))
        return equivalent
    try:
        decision = plan_route(parsed)
        metered = admit(parsed, decision)
    except AimeshError as exc:
        end_flight(flight, None)
        if errors_as_results:
            return error_result(exc)
        raise
    call = call_endpoint.signature(
        (message, [endpoint_to_args(e) for e in decision.route]),
        {"metered": metered, "flight": flight,
         **({"errors_as_results": True} if errors_as_results else {})},
        queue=decision.winner.queue,
        expires=parsed.deadline,
    )
    raise self.replace(call)
