"""`aimesh.call`: call the endpoint whose queue this is; fall back to the next on failure."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from celery import Task

from aimesh_tasks import events, keys
from aimesh_tasks.app import app
from aimesh_tasks.budgets.estimate import worst_case
from aimesh_tasks.budgets.ledger import reserve
from aimesh_tasks.errors import AimeshError, AllEndpointsFailed, ProviderError
from aimesh_tasks.governance.audit import audit
from aimesh_tasks.messages import AiMessage, Attempt, utcnow
from aimesh_tasks.money import usd_to_nusd
from aimesh_tasks.pipeline.call import attempt_call, build_result, endpoint_from_args
from aimesh_tasks.redis_batch import Batch
from aimesh_tasks.tasks.flight import end_flight, queue_end_flight
from aimesh_tasks.tasks.handoff import hand_off
from aimesh_tasks.tasks.reprs import message_reprs


def _final_error(message: AiMessage, error: ProviderError, past: list[Attempt]) -> AimeshError:
    if len(past) == 1:
        return error
    return AllEndpointsFailed(
        f"all {len(past)} endpoints failed for message '{message.id}'; last: {error.message}",
        endpoint_id=error.fields.get("endpoint_id"),
        attempts=[a.model_dump(mode="json") for a in past],
        retryable=False,
    )


def _fail(message: AiMessage, error: AimeshError) -> AimeshError:
    audit("failed", message_id=message.id, agent_id=message.agent_id,
          endpoint_id=error.fields.get("endpoint_id"), reason=error.message)
    events.message_failed.send(sender=call_endpoint, message=message, error=error)
    return error


def error_result(error: AimeshError) -> dict[str, Any]:
    """A failure as a task result, {"error": {code, message, ...fields}}, for callers that
    ask for errors as results (workflow steps: a raised error would fail a whole chord)."""
    return {"error": error.to_dict()}


def _give_up(message: AiMessage, error: AimeshError, as_result: bool) -> dict[str, Any]:
    failed = _fail(message, error)
    if as_result:
        return error_result(failed)
    raise failed


@app.task(name="aimesh.call", bind=True, throws=(AimeshError,))
def call_endpoint(
    self: Task,
    message: dict[str, Any],
    route: list[dict[str, Any]],
    attempts: list[dict[str, Any]] | None = None,
    started_at: str | None = None,
    metered: bool = False,
    flight: dict[str, Any] | None = None,
    errors_as_results: bool = False,
) -> dict[str, Any]:
    """Call route[0]; on a retryable failure, hand the message to a call to route[1]."""
    parsed = AiMessage.model_validate(message)
    endpoint = endpoint_from_args(route[0])
    past = [Attempt.model_validate(a) for a in attempts or []]
    first_started = utcnow() if started_at is None else datetime.fromisoformat(started_at)
    tail = Batch()  # the call's records, the audit and the flight's end: one round trip
    attempt, completion, error = attempt_call(parsed, endpoint, len(past), metered=metered,
                                              tail=tail)
    past.append(attempt)
    if completion is not None:
        result = build_result(parsed, endpoint, completion, past, first_started)
        audit("completed", message_id=parsed.id, agent_id=parsed.agent_id,
              endpoint_id=endpoint.id, tokens=result.input_tokens + result.output_tokens,
              cost_nusd=usd_to_nusd(result.cost_usd), batch=tail)
        answer_followers = queue_end_flight(tail, flight, result)
        tail.send()
        events.message_completed.send(sender=call_endpoint, message=parsed, result=result)
        answer_followers()
        return result.to_json_dict()
    tail.send()
    assert error is not None
    if not (error.retryable and len(route) > 1):
        end_flight(flight, None)
        return _give_up(parsed, _final_error(parsed, error, past), errors_as_results)
    fallback = endpoint_from_args(route[1])
    if metered:  # the fallback is another call: re-priced at its own endpoint
        try:
            reserve(parsed.agent_id, parsed.id, fallback.id, keys.call_key(parsed.id, len(past)),
                    worst_case(parsed, fallback))
        except AimeshError as exc:
            end_flight(flight, None)
            return _give_up(parsed, exc, errors_as_results)
    call_kwargs = {"metered": metered, "flight": flight,
                   **({"errors_as_results": True} if errors_as_results else {})}
    hand_off(self, call_endpoint.signature(
        (message, route[1:], [a.model_dump(mode="json") for a in past],
         first_started.isoformat()), call_kwargs,
        queue=fallback.queue, expires=parsed.deadline, **message_reprs(parsed, call_kwargs),
    ))
    return {}  # discarded: the fallback call's result is this message's
