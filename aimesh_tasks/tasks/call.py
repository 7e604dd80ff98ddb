"""`aimesh.call`: the call task, a shell over `pipeline.calling.call`."""

from __future__ import annotations

from typing import Any

from celery import Signature

from aimesh_tasks.app import app
from aimesh_tasks.envelope import Envelope, Flight
from aimesh_tasks.messages import AiMessage
from aimesh_tasks.pipeline import calling
from aimesh_tasks.pipeline.call import endpoint_from_args
from aimesh_tasks.resilience.priority import broker_priority
from aimesh_tasks.settings import get_settings
from aimesh_tasks.tasks.shell import MessageTask

DEFAULT_PRIORITY = AiMessage.model_fields["priority"].default


def call_signature(envelope: Envelope) -> Signature:
    """The call task for `envelope`, on its first endpoint's queue; only ids are shown
    in Flower and logs."""
    message = envelope.message  # read, not decoded: the call task decodes it
    priority = int(message.get("priority", DEFAULT_PRIORITY))
    return call_endpoint.signature(
        (envelope.to_json(),), queue=endpoint_from_args(envelope.route[0]).queue,
        priority=broker_priority(priority, get_settings().broker_url),
        argsrepr=f"(<envelope of message {message.get('id')} of agent "
                 f"{message.get('agent_id')}, attempt {envelope.attempt_no}>,)",
        kwargsrepr="{}")


def _legacy(message: dict[str, Any], route: list[Any], attempts: list[Any] | None,
            started_at: str | None, metered: bool, flight: dict[str, Any] | None,
            errors_as_results: bool) -> Envelope:
    """An envelope from the arguments a wave-1 router queued (message, route, ...)."""
    return Envelope(message=message, route=route, attempts=list(attempts or []),
                    metered=metered, flight=Flight.from_json(flight) if flight else None,
                    started_at=started_at, reply="result" if errors_as_results else "raise")


@app.task(name="aimesh.call", base=MessageTask, bind=True)
def call_endpoint(self: MessageTask, envelope: dict[str, Any], route: list[Any] | None = None,
                  attempts: list[Any] | None = None, started_at: str | None = None,
                  metered: bool = False, flight: dict[str, Any] | None = None,
                  errors_as_results: bool = False) -> Any:
    """Call the envelope's first endpoint; on a failure another endpoint may not have,
    hand the envelope to the next one. (The extra arguments read what a wave-1 router
    queued: message, route, attempts, ...)"""
    parsed = (Envelope.from_json(envelope) if route is None else
              _legacy(envelope, route, attempts, started_at, metered, flight, errors_as_results))
    wait_s = min(get_settings().task_soft_time_limit_s / 2, 30.0)
    outcome = self.guarded(lambda: calling.call(self.app, parsed, wait_s=wait_s))
    return self.deliver(outcome, parsed.reply, call_signature)
