"""Calling the first endpoint of an envelope, start to end, as a plain function that
returns an outcome.

    begin (journalled? held? take the lease) → [held: wait for the holder] →
    [journalled: its outcome again] → deadline → policies.before_call (refuse, delay, or
    refuse this endpoint only: the next one is tried) → the call, charged once →
    policies' call records → policies.after_call → Done / Fallback (the next endpoint, or
    the same one again after a wait; the next call reserved first) / Failed

A failed call whose message's deadline has passed ends in DeadlineExceeded, naming the
calls made. A call of a raced (hedged) message is watched for its race's win (aborted
if another call answers first), claims the race when it answers, and ends `Lost` when
another call's answer or failure is the message's (pipeline/race.py); a hedge's answer
is `AnswerFor` the message. The call task maps the outcome to Celery
(aimesh_tasks/tasks/call.py).
"""

from __future__ import annotations

import threading
from datetime import datetime
from typing import Any

from aimesh_tasks import events
from aimesh_tasks.budgets.admission import reserve_call
from aimesh_tasks.budgets.ledger import release
from aimesh_tasks.envelope import RETRIED_AFTER, AttemptRecord, Envelope
from aimesh_tasks.errors import (
    AimeshError,
    AllEndpointsFailed,
    CallNotNeeded,
    DeadlineExceeded,
    ProviderError,
    error_from_dict,
)
from aimesh_tasks.governance.audit import audit
from aimesh_tasks.messages import AiMessage, Attempt, utcnow
from aimesh_tasks.money import usd_to_nusd
from aimesh_tasks.pipeline import journal, lease, race
from aimesh_tasks.pipeline.call import (
    CallResult,
    begin,
    build_result,
    endpoint_from_args,
    give_back_uncalled,
    make_call,
    recover,
    wait_for_holder,
)
from aimesh_tasks.pipeline.flight import deadline_exceeded, end_flight, queue_end_flight
from aimesh_tasks.pipeline.outcomes import (
    AnswerFor,
    CallOutcome,
    Done,
    Failed,
    Fallback,
    Lost,
    Retry,
)
from aimesh_tasks.policies import AfterCall, CallContext, Policies, active
from aimesh_tasks.redis_batch import Batch
from aimesh_tasks.registry.live import call_abandoned
from aimesh_tasks.streams.writer import queue_end, queue_failure


def call(app: Any, envelope: Envelope, *, wait_s: float, policies: Policies | None = None
         ) -> CallOutcome:
    """Call `envelope.route[0]` for its message. `wait_s` bounds how long this delivery
    waits for another delivery holding the call's lease before asking to be retried."""
    policies = policies or active()
    message = AiMessage.decode(envelope.message)
    endpoint = endpoint_from_args(envelope.route[0])
    call_key = envelope.call_key
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
        delay_s = _before_call(message, ctx, policies, call_key, envelope.metered)
    except ProviderError as exc:  # this endpoint may not be called now (its breaker)
        journal.queue_record_failure(tail, began.charged_key, exc.to_dict())
        _give_back(ctx, began, tail)
        attempt = Attempt(endpoint_id=endpoint.id, ok=False, latency_ms=0.0,
                          error=exc.to_dict())
        return _after_failure(app, envelope, message, CallResult(attempt, None, exc, 0),
                              started_at, policies, ctx)
    except CallNotNeeded as exc:  # its race was won, or its hedge not fired
        _give_back(ctx, began, tail)
        return Lost(exc.message)
    except AimeshError as exc:
        _give_back(ctx, began, tail)
        return _failed(app, envelope, message, exc)
    except Exception:  # an outage in a policy's check: retried, and nothing was called
        give_back_uncalled(call_key, began.value, endpoint.id)
        raise
    if delay_s:  # the reservation stays: the same call is made after the wait
        _give_back(ctx, began, tail)
        return Retry(delay_s, f"a policy delayed call {call_key} by {delay_s:g} s")
    try:
        done = _make(ctx, began, tail)
    except AimeshError as exc:  # the reservation could not be made again (a takeover)
        lease.queue_release(tail, call_key, began.value)
        tail.send()
        return _failed(app, envelope, message, exc)
    return _decide(app, envelope, message, done, started_at, tail, policies, ctx)


def _make(ctx: CallContext, began: lease.Began, tail: Batch) -> CallResult:
    """Make the call; a raced message's is aborted once another call of its race wins."""
    message, envelope = ctx.message, ctx.envelope
    if envelope.lane is None:
        return make_call(message, ctx.endpoint, ctx.call_key, began,
                         metered=envelope.metered, tail=tail)
    cancel = threading.Event()
    with race.RACE_WATCH.watching(message.id, cancel):
        return make_call(message, ctx.endpoint, ctx.call_key, began,
                         metered=envelope.metered, tail=tail, cancel=cancel)


def _before_call(message: AiMessage, ctx: CallContext, policies: Policies, call_key: str,
                 metered: bool) -> float | None:
    """Refuse a call whose deadline passed, or that a policy refuses (its reservation is
    given back: nothing was called); the seconds a policy asks to delay it, if any."""
    try:
        if message.expired():
            raise deadline_exceeded(message, "before its call was made")
        return policies.before_call(ctx)
    except AimeshError:
        if metered:
            release(call_key, only_if_uncalled=True)
        raise


def _give_back(ctx: CallContext, began: lease.Began, tail: Batch) -> None:
    """A call not made: free its lease and take it out of the endpoint's calls in flight."""
    lease.queue_release(tail, ctx.call_key, began.value)
    tail.send()
    call_abandoned(ctx.endpoint.id, ctx.call_key)


def _decide(app: Any, envelope: Envelope, message: AiMessage, done: CallResult,
            started_at: datetime, tail: Batch, policies: Policies, ctx: CallContext
            ) -> CallOutcome:
    policies.queue_call_records(tail, ctx, done.error)
    if done.completion is None:
        tail.send()
        return _after_failure(app, envelope, message, done, started_at, policies, ctx)
    if envelope.lane is not None and not race.claim(message.id, envelope.lane):
        tail.send()  # charged from its own usage; another call's answer is the message's
        return Lost(f"another call of message '{message.id}' answered first")
    endpoint = done.endpoint or ctx.endpoint
    past = [*(Attempt.model_validate(a) for a in envelope.attempts), done.attempt]
    charged = envelope.charged_nusd + done.charged_nusd
    result = build_result(message, endpoint, done.completion, past, started_at, charged,
                          envelope.queue_position)
    audit("completed", message_id=message.id, agent_id=message.agent_id,
          endpoint_id=endpoint.id, tokens=result.input_tokens + result.output_tokens,
          cost_nusd=usd_to_nusd(result.cost_usd), batch=tail,
          detail={"usage_estimated": True} if done.estimated else None)
    answer_followers = queue_end_flight(app, tail, envelope.flight, result)
    if message.stream:  # after the call was settled: the relay shows the usage charged
        queue_end(tail, message.id, result.to_json_dict())
    tail.send()
    events.message_completed.send(sender=call, message=message, result=result)
    answer_followers()
    if envelope.lane:  # a hedge's answer: stored under the message's id
        return AnswerFor(message.id, result=result.to_json_dict())
    return Done(result.to_json_dict())


def _after_failure(app: Any, envelope: Envelope, message: AiMessage, done: CallResult,
                   started_at: datetime, policies: Policies, ctx: CallContext
                   ) -> CallOutcome:
    """After a failed (or refused) call: the same endpoint again, the next one, or the
    message's failure."""
    error = done.error
    assert error is not None
    if envelope.lane is not None and race.read(message.id).winner is not None:
        return Lost(f"another call of message '{message.id}' answered first")
    past = [*(Attempt.model_validate(a) for a in envelope.attempts), done.attempt]
    charged = envelope.charged_nusd + done.charged_nusd
    if message.expired():
        return _failed(app, envelope, message, _expired(message, past))
    if envelope.lane:  # a hedge is one call: the primary's path retries and falls back
        return _failed(app, envelope, message, error)
    asked = policies.after_call(ctx, error)
    nxt, countdown_s = _next_hop(envelope, done, asked, charged, started_at.isoformat())
    if nxt is None:
        return _failed(app, envelope, message, _final_error(message, error, past))
    if envelope.metered:  # the next call is another call: reserved at its own endpoint
        try:
            reserve_call(message, endpoint_from_args(nxt.route[0]), nxt.attempt_no, True)
        except AimeshError as exc:
            return _failed(app, envelope, message, exc)
    return Fallback(nxt, countdown_s)


def _failed(app: Any, envelope: Envelope, message: AiMessage, error: AimeshError
            ) -> CallOutcome:
    """The message fails with `error`; for a raced one, only once every call of the race
    that started has failed (pipeline/race.py): a hedge then delivers the primary's
    error, and a call whose failure is not the last ends Lost."""
    lane = envelope.lane
    if lane:
        kept = race.hedge_failed(message.id, lane)
        if kept is None:
            return Lost(f"hedge {lane} of message '{message.id}' failed; its race goes on")
        error = error_from_dict(kept)
    elif lane == 0 and race.primary_failed(message.id, error.to_dict()) != "deliver":
        return Lost(f"the first call of message '{message.id}' failed; a hedge still runs")
    end_flight(app, envelope.flight, None)
    failed = _fail(message, error)
    return AnswerFor(message.id, error=failed) if lane else Failed(failed)


def _next_hop(envelope: Envelope, done: CallResult, asked: AfterCall | None, charged: int,
              started_at: str) -> tuple[Envelope | None, float]:
    """The envelope of the next call and the wait before it; None: no next call. Only a
    policy's 'retry' calls the same endpoint again; the adapter's own 'retry' class, with
    no policy asking, falls back like any endpoint fault."""
    attempt: AttemptRecord = done.attempt.model_dump(mode="json")  # type: ignore[assignment]
    if asked is not None and asked.verdict == "retry":
        attempt["error"] = {**(attempt.get("error") or {}), RETRIED_AFTER: asked.delay_s}
        return envelope.retry_hop(attempt, charged, started_at), asked.delay_s
    action = asked.verdict if asked is not None else done.error.action if done.error else "fail"
    if action == "fail" or len(envelope.route) < 2:
        return None, 0.0
    return envelope.next_hop(attempt, charged, started_at), asked.delay_s if asked else 0.0


def _attempts_line(past: list[Attempt]) -> str:
    """Every attempt, one phrase each: 'ep-a HTTP 429 rate_limited, ep-b transport'."""
    def one(attempt: Attempt) -> str:
        error = attempt.error or {}
        status = f"HTTP {error['status']} " if error.get("status") else ""
        return f"{attempt.endpoint_id} {status}{error.get('reason') or 'failed'}"

    return ", ".join(one(a) for a in past)


def _final_error(message: AiMessage, error: ProviderError, past: list[Attempt]) -> AimeshError:
    if len(past) == 1:
        return error
    endpoints = len({a.endpoint_id for a in past})
    return AllEndpointsFailed(
        f"every call for message '{message.id}' failed: {len(past)} calls at {endpoints} "
        f"endpoint(s) ({_attempts_line(past)}); last: {error.message}",
        endpoint_id=error.fields.get("endpoint_id"),
        attempts=[a.model_dump(mode="json") for a in past],
        retryable=False,
    )


def _expired(message: AiMessage, past: list[Attempt]) -> DeadlineExceeded:
    """DeadlineExceeded after calls were made, naming them."""
    plain = deadline_exceeded(message, f"after {len(past)} call(s) ({_attempts_line(past)})")
    return DeadlineExceeded(plain.message, {**plain.fields,
                                            "attempts": [a.model_dump(mode="json") for a in past]})


def _fail(message: AiMessage, error: AimeshError) -> AimeshError:
    batch = Batch()
    audit("failed", message_id=message.id, agent_id=message.agent_id,
          endpoint_id=error.fields.get("endpoint_id"), reason=error.message, batch=batch)
    if message.stream:
        queue_failure(batch, message.id, error.to_dict())
    batch.send()
    events.message_failed.send(sender=call, message=message, error=error)
    return error
