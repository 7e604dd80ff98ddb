"""Routing one message, start to end, as a plain function that returns an outcome.

    deadline → one Redis round trip (dedup join, live figures, metered flag, policies'
    reads) → already handed off? / cache hit / join a flight → policies.before_route
    (refuse, or wait: Requeue) → semantic cache → decide among the candidates
    policies.choose leaves → policies.admit (the budget reservation) → [every candidate
    at capacity: the position it takes in the winner's queue] → remember the hand-off
    (and send the routing records) → HandOff (with the hedges policies asked for)

Every step either adds to the outcome or ends it; the routing task maps the outcome
to Celery (aimesh_tasks/tasks/route.py). Nothing here needs a worker.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from aimesh_tasks import events, queue_position
from aimesh_tasks.dedup.cache import queue_remember_handoff
from aimesh_tasks.envelope import Envelope, Flight, Reply
from aimesh_tasks.errors import AimeshError
from aimesh_tasks.governance.audit import audit
from aimesh_tasks.messages import AiMessage, AiResult
from aimesh_tasks.pipeline import semantic
from aimesh_tasks.pipeline.call import endpoint_to_args
from aimesh_tasks.pipeline.dedup import answer_from_cache, queue_join_flight, semantic_answer
from aimesh_tasks.pipeline.flight import deadline_exceeded, end_flight
from aimesh_tasks.pipeline.outcomes import (
    HandOff,
    Hedge,
    Hit,
    Joined,
    Refused,
    Requeue,
    RouteOutcome,
)
from aimesh_tasks.pipeline.route import RouteInputs, plan_route, queue_route_inputs
from aimesh_tasks.policies import ExtraCall, Policies, RouteContext, Wait, active
from aimesh_tasks.redis_batch import Batch
from aimesh_tasks.settings import get_settings

# A hand-off found again (a duplicate delivery) returns before this is read.
DEDUP_OUTCOMES = {"hit": "hit", "follow": "join", "lead": "miss"}


def route(app: Any, message: AiMessage, *, in_canvas: bool = False, reply: Reply = "raise",
          policies: Policies | None = None, batch: Batch | None = None) -> RouteOutcome:
    """Route `message` (its id is the task id); `app` publishes to followers of a flight
    this message ends without an answer. `batch` may hold the caller's own writes, sent
    in the first round trip (not sent at all for a message past its deadline)."""
    if message.expired():
        error = deadline_exceeded(message, "while it waited in the routing queue")
        _audit_failed(message, error)
        return Refused(error)
    policies = policies or active()
    batch = batch or Batch()
    read_flight = queue_join_flight(batch, message, message.id, may_follow=not in_canvas)
    read_inputs = queue_route_inputs(batch, message)
    read_policies = policies.queue_route_reads(batch, message)
    batch.send()
    joined, flight = read_flight()
    if joined.decision == "handed" and joined.handed is not None:
        return _handed(joined.handed, message)
    events.message_deduplicated.send(
        sender=route, message=message, result=joined.cached,
        outcome="bypass" if message.no_cache else DEDUP_OUTCOMES[joined.decision])
    if joined.decision == "hit":
        return Hit(answer_from_cache(message, joined.cached or {}))
    if joined.decision == "follow":
        return Joined()
    inputs = read_inputs()
    ctx = RouteContext(message, metered_hint=inputs.metered, reads=read_policies(),
                       in_canvas=in_canvas or reply == "result")
    try:
        outcome = _lead(app, message, ctx, policies, flight, inputs, reply)
    except AimeshError as exc:
        end_flight(app, flight, None)
        return Refused(exc)
    if isinstance(outcome, Requeue):  # it leads nothing while it waits: its followers
        end_flight(app, flight, None)  # route again, and the first of them leads
    return outcome


def _lead(app: Any, message: AiMessage, ctx: RouteContext, policies: Policies,
          flight: Flight | None, inputs: RouteInputs, reply: Reply) -> RouteOutcome:
    try:
        wait = policies.before_route(ctx)
    except AimeshError as exc:
        audit("denied", message_id=message.id, agent_id=message.agent_id,
              reason=exc.message[:512], detail={"policy": _policy_of(exc), **exc.to_dict()})
        raise
    if wait is not None:
        return _requeue(message, ctx, wait)
    if flight is not None:
        equivalent = semantic_answer(message, flight)
        if equivalent is not None:
            end_flight(app, flight, AiResult.model_validate(equivalent))
            return Hit(equivalent)
    records = Batch()
    decision = plan_route(message, inputs, records,
                          choose=lambda candidates: policies.choose(ctx, candidates),
                          notes=ctx.notes)
    try:
        policies.admit(ctx, decision)
    except AimeshError:
        records.send()  # the decision is recorded whether or not it was admitted
        raise
    # Every candidate at capacity: it waits in the winner's queue, behind this many.
    position = (queue_position.on_enqueue(get_settings().broker_url, decision.winner.queue,
                                          message.priority) if decision.saturated else None)
    envelope = Envelope(message=message.to_json_dict(),
                        route=[endpoint_to_args(e) for e in decision.route],
                        metered=ctx.metered, flight=flight, reply=reply,
                        queue_position=position, lane=0 if ctx.extra_calls else None)
    # Kept with the records, in their round trip: a duplicate delivery of this message
    # that routed at the same moment gets the envelope kept first, so both hand off the
    # same call (whose lease then makes it one call, one charge).
    # Its hedges are kept with it: a delivery that finds the hand-off publishes them too.
    ttl_s = int(get_settings().reservation_timeout_s) + 86400
    kept = _without_prompt(envelope, _hedge_plans(ctx.extra_calls))
    read_kept = queue_remember_handoff(records, message.id, kept, ttl_s)
    records.send()
    return _handed(read_kept(), message, envelope.message)


def _hedge_plans(extra: list[ExtraCall]) -> list[dict[str, Any]]:
    """The hedges asked for, as kept with the hand-off: each one call at its endpoint in
    its own lane of the race, after a countdown never longer than half the visibility
    timeout (the broker would deliver the unacked task again)."""
    cap_s = get_settings().visibility_timeout_s / 2
    return [{"lane": call.lane, "route": [endpoint_to_args(call.endpoint)],
             "countdown_s": min(call.countdown_s, cap_s)} for call in extra]


def _requeue(message: AiMessage, ctx: RouteContext, wait: Wait) -> Requeue:
    """Wait as a policy asked, for at most half the visibility timeout (a longer countdown
    would outlive the broker's redelivery of the unacked task): on arrival the message is
    routed again from the start, and the policy checks again."""
    countdown_s = min(wait.wait_s, get_settings().visibility_timeout_s / 2)
    reason = f"{wait.policy} asked it to wait {wait.wait_s:.3f} s"
    audit("queued", message_id=message.id, agent_id=message.agent_id, reason=reason,
          detail={"policy": wait.policy, "wait_s": wait.wait_s, "countdown_s": countdown_s,
                  **ctx.notes.get(wait.policy, {})})
    return Requeue(countdown_s, reason)


def _without_prompt(envelope: Envelope, hedges: list[dict[str, Any]]) -> dict[str, Any]:
    """The hand-off as kept in Redis: no message and no prompt text (prompts are stored
    only where configured; a duplicate delivery carries the same message itself), and
    each hedge as its lane, endpoint and countdown."""
    kept = envelope.to_json()
    kept["message"] = {}
    if kept.get("flight"):
        kept["flight"] = {k: v for k, v in kept["flight"].items() if k != "semantic_text"}
    if hedges:
        kept["hedges"] = hedges
    return kept


def _handed(kept: dict[str, Any], message: AiMessage,
            message_json: dict[str, Any] | None = None) -> HandOff:
    """The kept hand-off, completed with this delivery's own copy of the message (its JSON
    form when the caller has it), with its hedges (published again by a delivery after
    the first: the hedge's call key, lane and lease make a hedge one call and one token
    however often it is published)."""
    flight = kept.get("flight")
    if flight and semantic.enabled_for(message.agent_id):
        flight = {**flight, "semantic_text": semantic.prompt_text(message)}
    envelope = Envelope.from_json({**kept, "message": message_json or message.to_json_dict(),
                                   "flight": flight})
    hedges = tuple(Hedge(replace(envelope, route=list(h["route"]), lane=int(h["lane"]),
                                 queue_position=None), float(h["countdown_s"]))
                   for h in kept.get("hedges") or ())
    return HandOff(envelope, hedges)


def _policy_of(error: AimeshError) -> str:
    return str(error.fields.get("policy") or type(error).__name__)


def _audit_failed(message: AiMessage, error: AimeshError) -> None:
    audit("failed", message_id=message.id, agent_id=message.agent_id, reason=error.message)
    events.message_failed.send(sender=route, message=message, error=error)
