"""Calling the first endpoint of an envelope, start to end, as a plain function that
returns an outcome.

    begin (journalled? held? take the lease) → [held: wait for the holder] →
    [journalled: its outcome again] → deadline → policies.before_call → the call, charged
    once → policies.after_call → Done / Fallback (reserve the next call first) / Failed

The call task maps the outcome to Celery (aimesh_tasks/tasks/call.py).
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from aimesh_tasks import events, keys
from aimesh_tasks.budgets.admission import reserve_call
from aimesh_tasks.budgets.ledger import release
from aimesh_tasks.envelope import Envelope
from aimesh_tasks.errors import AimeshError, AllEndpointsFailed, ProviderError
from aimesh_tasks.governance.audit import audit
from aimesh_tasks.messages import AiMessage, Attempt, utcnow
from aimesh_tasks.money import usd_to_nusd
from aimesh_tasks.pipeline import lease
from aimesh_tasks.pipeline.call import (
    CallResult,
    begin,
    build_result,
    endpoint_from_args,
    make_call,
    recover,
    wait_for_holder,
)
from aimesh_tasks.pipeline.flight import deadline_exceeded, end_flight, queue_end_flight
from aimesh_tasks.pipeline.outcomes import CallOutcome, Done, Failed, Fallback, Retry
from aimesh_tasks.policies import CallContext, Policies, active
from aimesh_tasks.redis_batch import Batch


def call(app: Any, envelope: Envelope, *, wait_s: float, policies: Policies | None = None
         ) -> CallOutcome:
    """Call `envelope.route[0]` for its message. `wait_s` bounds how long this delivery
    waits for another delivery holding the call's lease before asking to be retried."""
    policies = policies or active()
    message = AiMessage.decode(envelope.message)
    endpoint = endpoint_from_args(envelope.route[0])
    call_key = keys.call_key(message.id, envelope.attempt_no)
    ctx = CallContext(message, envelope, endpoint, call_key)
    reads: dict[str, Any] = {}

    def queue_reads(batch: Batch) -> None:
        read = policies.queue_call_reads(batch, ctx)
        reads["read"] = read

    began = begin(call_key, endpoint, queue_reads)
    ctx.reads = reads["read"]()
    if began.state == "held":
        began = wait_for_holder(call_key, endpoint, began.value, wait_s)
        if began.state == "held":
            return Retry(1.0, f"call {call_key} is being made by another delivery")
    started_at = (datetime.fromisoformat(envelope.started_at) if envelope.started_at
                  else utcnow())
    if began.state == "journalled":
        done = recover(message, endpoint, began, envelope.metered)
        return _decide(app, envelope, message, done, started_at, Batch(), policies, ctx)
    tail = Batch()
    try:
        _before_call(message, ctx, policies, call_key, envelope.metered)
    except AimeshError as exc:
        lease.queue_release(tail, call_key, began.value)
        tail.send()
        end_flight(app, envelope.flight, None)
        return Failed(_fail(message, exc))
    try:
        done = make_call(message, endpoint, call_key, began, metered=envelope.metered,
                         tail=tail)
    except AimeshError as exc:  # the reservation could not be made again (a takeover)
        lease.queue_release(tail, call_key, began.value)
        tail.send()
        end_flight(app, envelope.flight, None)
        return Failed(_fail(message, exc))
    return _decide(app, envelope, message, done, started_at, tail, policies, ctx)


def _before_call(message: AiMessage, ctx: CallContext, policies: Policies, call_key: str,
                 metered: bool) -> None:
    """Refuse a call whose deadline passed, or that a policy refuses; its reservation
    is given back (nothing was called)."""
    try:
        if message.expired():
            raise deadline_exceeded(message, "before its call was made")
        policies.before_call(ctx)
    except AimeshError:
        if metered:
            release(call_key, only_if_uncalled=True)
        raise


def _decide(app: Any, envelope: Envelope, message: AiMessage, done: CallResult,
            started_at: datetime, tail: Batch, policies: Policies, ctx: CallContext
            ) -> CallOutcome:
    endpoint = ctx.endpoint
    past = [*(Attempt.model_validate(a) for a in envelope.attempts), done.attempt]
    charged = envelope.charged_nusd + done.charged_nusd
    if done.completion is not None:
        result = build_result(message, endpoint, done.completion, past, started_at, charged)
        audit("completed", message_id=message.id, agent_id=message.agent_id,
              endpoint_id=endpoint.id, tokens=result.input_tokens + result.output_tokens,
              cost_nusd=usd_to_nusd(result.cost_usd), batch=tail,
              detail={"usage_estimated": True} if done.estimated else None)
        answer_followers = queue_end_flight(app, tail, envelope.flight, result)
        tail.send()
        events.message_completed.send(sender=call, message=message, result=result)
        answer_followers()
        return Done(result.to_json_dict())
    tail.send()
    error = done.error
    assert error is not None
    asked = policies.after_call(ctx, error)
    action = asked.verdict if asked is not None else error.action
    if action == "fail" or len(envelope.route) < 2:
        end_flight(app, envelope.flight, None)
        return Failed(_fail(message, _final_error(message, error, past)))
    nxt = envelope.next_hop(done.attempt.model_dump(mode="json"), charged,  # type: ignore[arg-type]
                            started_at.isoformat())
    if envelope.metered:  # the fallback is another call: re-priced at its own endpoint
        try:
            reserve_call(message, endpoint_from_args(nxt.route[0]), nxt.attempt_no, True)
        except AimeshError as exc:
            end_flight(app, envelope.flight, None)
            return Failed(_fail(message, exc))
    return Fallback(nxt)


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
    events.message_failed.send(sender=call, message=message, error=error)
    return error
