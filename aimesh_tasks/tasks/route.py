"""`aimesh.route`: the routing task, a shell over `pipeline.routing.route`."""

from __future__ import annotations

from typing import Any

from celery import Signature
from celery.result import AsyncResult

from aimesh_tasks.app import app
from aimesh_tasks.delivery import accepted
from aimesh_tasks.envelope import Envelope, Reply
from aimesh_tasks.errors import InvalidMessage
from aimesh_tasks.governance.audit import audit
from aimesh_tasks.keys import ROUTE_QUEUE
from aimesh_tasks.messages import AiMessage, parse_message
from aimesh_tasks.pipeline import routing
from aimesh_tasks.pipeline.outcomes import RouteOutcome
from aimesh_tasks.pipeline.reprs import message_reprs
from aimesh_tasks.redis_batch import Batch
from aimesh_tasks.resilience.priority import broker_priority
from aimesh_tasks.settings import get_settings
from aimesh_tasks.tasks.call import call_signature
from aimesh_tasks.tasks.handoff import in_canvas
from aimesh_tasks.tasks.shell import MessageTask


def validate_or_audit(data: Any) -> AiMessage:
    """Parse a message; an invalid one is audited as 'rejected' before the error is raised."""
    try:
        return parse_message(data)
    except InvalidMessage as exc:
        raw = data if isinstance(data, dict) else {}
        audit("rejected", message_id=str(raw.get("id", "")), agent_id=str(raw.get("agent_id", "")),
              reason=exc.message, detail={"errors": exc.fields.get("errors", [])})
        raise


def decode_message(data: Any) -> AiMessage:
    """A message inside the task: decoded, not validated again against the clock or
    caps; InvalidMessage (naming the field) if it is not a message at all."""
    if not isinstance(data, dict):
        raise InvalidMessage(f"message: expected a JSON object, got {type(data).__name__}",
                             field="message", errors=[])
    try:
        return AiMessage.decode(data)
    except ValueError:
        return parse_message(data)  # raises InvalidMessage with the field named


# A step of a canvas (chain, group, chord, or a message with callbacks: a workflow step)
# is not recorded as accepted: published again alone, without its callbacks, it could
# never complete its workflow.
_CANVAS_OPTIONS = ("chord", "group_id", "chain", "link", "link_error")


class RouteTask(MessageTask):
    """Validates the message where it enters; the task id is the message id."""

    def apply_async(
        self, args: Any = None, kwargs: Any = None, **options: Any
    ) -> AsyncResult:
        """Validate the message in full (an AiMessage is taken as validated: submit()
        validated it), record it as accepted (delivery.accepted), then publish it. Its
        deadline is checked by the task itself (a late message gets DeadlineExceeded, not
        a silent revoke)."""
        message = validate_or_audit((kwargs or {}).get("message") or (args or [None])[0])
        options.setdefault("task_id", message.id)
        options.setdefault("queue", ROUTE_QUEUE)
        options.setdefault("priority", broker_priority(message.priority,
                                                       get_settings().broker_url))
        extra = {k: v for k, v in (kwargs or {}).items() if k != "message"} or None
        for option, shown in message_reprs(message, extra).items():
            options.setdefault(option, shown)
        recorded = (accepted.enabled() and not any(options.get(o) for o in _CANVAS_OPTIONS)
                    and accepted.record(message))
        try:
            return super().apply_async((message.to_json_dict(),), extra, **options)
        except Exception:
            if recorded:  # its producer gets the error: nothing was accepted
                accepted.forget(message.id)
            raise


def _next_call(envelope: Envelope) -> Signature:
    return call_signature(envelope)


# AimeshError outcomes (budget refused, no endpoint, provider failed) are expected: Celery
# logs them as one line, without a traceback.
@app.task(name="aimesh.route", base=RouteTask, bind=True)
def route_message(self: RouteTask, message: dict[str, Any], errors_as_results: bool = False
                  ) -> Any:
    """Answer from cache, join an identical message in flight, or route the message and
    hand it to the call on the winner's queue, under this task's id. With errors_as_results
    (workflow steps), a refusal or failure is returned as {"error": {...}}, not raised."""
    reply: Reply = "result" if errors_as_results else "raise"
    parsed = decode_message(message)
    canvas = in_canvas(self.request)

    def route() -> RouteOutcome:
        first = Batch()
        if accepted.enabled() and not canvas:  # in routing's first round trip
            accepted.queue_seen(first, parsed.id)
        return routing.route(self.app, parsed, in_canvas=canvas, reply=reply, batch=first)

    outcome = self.guarded(route)
    return self.deliver(outcome, reply, _next_call)
