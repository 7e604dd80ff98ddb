"""`aimesh.route`: pick the endpoint for a message, reserve its budget, hand it to the
endpoint's queue."""

from __future__ import annotations

from typing import Any

from celery import Task
from celery.result import AsyncResult

from aimesh_tasks import events
from aimesh_tasks.app import app
from aimesh_tasks.errors import AimeshError, InvalidMessage
from aimesh_tasks.governance.audit import audit
from aimesh_tasks.keys import ROUTE_QUEUE
from aimesh_tasks.messages import AiMessage, AiResult, parse_message
from aimesh_tasks.pipeline.call import endpoint_to_args
from aimesh_tasks.pipeline.dedup import answer_from_cache, queue_join_flight, semantic_answer
from aimesh_tasks.pipeline.route import admit, plan_route, queue_route_inputs
from aimesh_tasks.redis_batch import Batch
from aimesh_tasks.tasks.call import call_endpoint, error_result
from aimesh_tasks.tasks.flight import end_flight
from aimesh_tasks.tasks.handoff import discard_result, hand_off, in_canvas
from aimesh_tasks.tasks.reprs import message_reprs


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
        for option, shown in message_reprs(message, extra).items():
            options.setdefault(option, shown)
        return super().apply_async((message.to_json_dict(),), extra, **options)


# AimeshError outcomes (budget refused, no endpoint, provider failed) are expected: Celery
# logs them as one line, without a traceback.
@app.task(name="aimesh.route", base=RouteTask, bind=True, throws=(AimeshError,))
def route_message(self: Task, message: dict[str, Any], errors_as_results: bool = False) -> Any:
    """Answer from cache, join an identical message in flight, or route the message and
    hand it to the call on the winner's queue, under this task's id. With errors_as_results
    (workflow steps), a refusal or failure is returned as {"error": {...}}, not raised."""
    parsed = AiMessage.model_validate(message)
    # One round trip: the dedup decision, and what routing needs if the message leads.
    batch = Batch()
    read_flight = queue_join_flight(batch, parsed, self.request.id,
                                    may_follow=not in_canvas(self.request))
    read_inputs = queue_route_inputs(batch, parsed)
    batch.send()
    joined, flight = read_flight()
    events.message_deduplicated.send(
        sender=route_message, message=parsed, result=joined.cached,
        outcome="bypass" if parsed.no_cache else DEDUP_OUTCOMES[joined.decision])
    if joined.decision == "hit":
        return answer_from_cache(parsed, joined.cached or {})
    if joined.decision == "follow":
        discard_result(self)  # the leader stores this task's result when it has the answer
        return None
    equivalent = semantic_answer(parsed, flight)
    if equivalent is not None:
        end_flight(flight, AiResult.model_validate(equivalent))
        return equivalent
    try:
        inputs = read_inputs()
        decision = plan_route(parsed, inputs)
        metered = admit(parsed, decision, inputs.metered)
    except AimeshError as exc:
        end_flight(flight, None)
        if errors_as_results:
            return error_result(exc)
        raise
    call_kwargs = {"metered": metered, "flight": flight,
                   **({"errors_as_results": True} if errors_as_results else {})}
    call = call_endpoint.signature(
        (message, [endpoint_to_args(e) for e in decision.route]), call_kwargs,
        queue=decision.winner.queue, expires=parsed.deadline,
        **message_reprs(parsed, call_kwargs),
    )
    hand_off(self, call)
    return None
