"""One call for one envelope, charged exactly once: lease, claim, call, journal, settle.

    begin (one round trip: journalled outcome? lease held? take it; in flight at the
    endpoint; policies' reads) → [journalled: settle it, don't repeat (a streaming message
    replays its text)] → [held: wait for the holder's journal] → claim the reservation →
    [settled, its outcome kept with the settlement: journal it again, don't repeat] →
    call (streamed: pipeline/streaming.py) → journal → settle → records

A call that may have reached the provider is charged once: by its own delivery, by a
later delivery that finds its journal, or (a delivery that died mid-call) as `lost` at
its reservation by the delivery that takes over — never twice, and never for a call
that certainly was not made. A metered call's settlement keeps its journal entry, so a
Redis that loses the journal does not make a settled call again (pipeline/durable.py).
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any

import redis
from celery.exceptions import SoftTimeLimitExceeded

from aimesh_tasks import events, outbox
from aimesh_tasks.budgets.estimate import Estimate, worst_case
from aimesh_tasks.budgets.ledger import claim, estimate_of, reserve, settle
from aimesh_tasks.envelope import RouteEntry
from aimesh_tasks.errors import AimeshError, ProviderError
from aimesh_tasks.failpoints import failpoint
from aimesh_tasks.messages import AiMessage, AiResult, Attempt, utcnow
from aimesh_tasks.money import call_cost_nusd, nusd_to_usd
from aimesh_tasks.pipeline import durable, journal, lease
from aimesh_tasks.pipeline.streaming import ABORTED, StreamedCall, aborted_charge
from aimesh_tasks.providers.base import Completion
from aimesh_tasks.providers.http import call_provider
from aimesh_tasks.redis_batch import Batch
from aimesh_tasks.registry.endpoints import Endpoint
from aimesh_tasks.registry.live import (
    call_abandoned,
    queue_call_abandoned,
    queue_call_finished,
    queue_call_started,
)
from aimesh_tasks.settings import get_settings
from aimesh_tasks.streams.writer import replay

WAIT_POLL_S = 0.05


def endpoint_to_args(endpoint: Endpoint) -> RouteEntry:
    """An endpoint as it travels in an envelope. `origin` travels only for a
    self-registered one, so a worker of the release before it reads every other envelope."""
    # Its fields are scalars: a shallow copy (asdict copies deep: 46 µs against 3.6 here).
    entry = {name: getattr(endpoint, name) for name in Endpoint.__slots__}
    entry["tags"] = sorted(endpoint.tags)
    if not endpoint.announced:
        del entry["origin"]
    return entry  # type: ignore[return-value]


def endpoint_from_args(data: RouteEntry | dict[str, Any]) -> Endpoint:
    """The endpoint carried in an envelope."""
    return Endpoint(**{**data, "tags": frozenset(data.get("tags", ()))})


def cost_of(endpoint: Endpoint, completion: Completion) -> int:
    """What a completion cost at the endpoint's prices, in nano-USD."""
    return call_cost_nusd(completion.input_tokens, completion.output_tokens,
                          endpoint.input_nusd_per_1k, endpoint.output_nusd_per_1k)


@dataclass(frozen=True, slots=True)
class CallResult:
    """One call's outcome: the attempt record, the answer or the error, what the call
    was charged (nano-USD, lost predecessors included), whether its usage was the
    reserved worst case because the provider sent none, and the endpoint it was made at
    when that is not the envelope's (recalled from its settlement after a new routing)."""

    attempt: Attempt
    completion: Completion | None
    error: ProviderError | None
    charged_nusd: int
    estimated: bool = False
    endpoint: Endpoint | None = None


def _estimated(message: AiMessage, endpoint: Endpoint, done: Completion
               ) -> tuple[Completion, int]:
    """A completion without usage, at the reserved worst case (never at zero)."""
    need = worst_case(message, endpoint)
    priced = Completion(text=done.text, input_tokens=need.input_tokens,
                        output_tokens=need.output_tokens, model=done.model,
                        finish_reason=done.finish_reason, request_id=done.request_id,
                        usage_known=False)
    return priced, need.nusd


def _record_attempt(message: AiMessage, endpoint: Endpoint, attempt: Attempt,
                    completion: Completion | None, cost_nusd: int, batch: Batch) -> None:
    error = attempt.error or {}
    outbox.append("call_attempt", {
        "message_id": message.id,
        "agent_id": message.agent_id,
        "endpoint_id": endpoint.id,
        "ok": attempt.ok,
        "status": error.get("status"),
        "latency_ms": attempt.latency_ms,
        "input_tokens": completion.input_tokens if completion else 0,
        "output_tokens": completion.output_tokens if completion else 0,
        "cost_nusd": cost_nusd,
        "error": str(error.get("message", ""))[:512] or None,
        "created_at": utcnow(),
    }, batch=batch)


def _take_over(message: AiMessage, endpoint: Endpoint, call_key: str, began: lease.Began
               ) -> tuple[str, int] | CallResult:
    """Claim the call's reservation (reserving again if it was released or never made);
    the key to call under and what a predecessor was charged. A claim found from an
    earlier delivery that left no journal means the provider may have been called then:
    that call is charged `lost` at its reservation, and a new key is used. A call found
    settled whose settlement kept its outcome (Redis lost the journal) is that outcome:
    nothing is called (pipeline/durable.py)."""
    charged_key = began.charged_key
    state = claim(charged_key)
    if state == "claimed":
        return charged_key, 0
    if state == "settled":
        recalled = durable.recall(message.id, call_key, began, endpoint)
        if recalled is not None:  # settled already: recovered without settling again
            done = recover(message, recalled.endpoint, recalled.began, metered=False)
            return replace(done, charged_nusd=recalled.charged_nusd,
                           endpoint=recalled.endpoint)
    lost_nusd = 0
    if state == "called_before":
        held = estimate_of(charged_key)
        if held is not None and settle(charged_key, held.tokens, held.nusd, kind="lost"):
            lost_nusd = held.nusd
    if state in ("called_before", "settled"):
        charged_key = f"{call_key}:redo-{uuid.uuid4().hex[:8]}"
        batch = Batch()
        lease.queue_charge_under(batch, call_key, charged_key, journal.retention_s())
        batch.send()
    reserve(message.agent_id, message.id, endpoint.id, charged_key, worst_case(message, endpoint))
    claim(charged_key)
    return charged_key, lost_nusd


def _call(message: AiMessage, endpoint: Endpoint, call_key: str,
          cancel: threading.Event | None = None
          ) -> tuple[Attempt, Completion | None, ProviderError | None]:
    started = time.perf_counter()
    completion: Completion | None = None
    error: ProviderError | None = None
    streamed = StreamedCall(message, endpoint, call_key) if message.stream else None
    try:
        completion = (streamed() if streamed is not None
                      else call_provider(endpoint, message, call_key, cancel=cancel))
    except ProviderError as exc:
        error = exc
    except SoftTimeLimitExceeded:  # a hang past the soft time limit: the request was sent
        error = ProviderError(
            f"endpoint '{endpoint.id}' did not answer within the task's soft time limit",
            endpoint_id=endpoint.id, action="fallback", reason="timeout", maybe_billed=True,
            retryable=True)
    if error is not None and streamed is not None:
        error = streamed.final(error)
    latency_ms = (time.perf_counter() - started) * 1000
    attempt = Attempt(endpoint_id=endpoint.id, ok=error is None, latency_ms=round(latency_ms, 3),
                      error=error.to_dict() if error else None)
    return attempt, completion, error


def begin(call_key: str, endpoint: Endpoint, queue_more: Callable[[Batch], Any] | None = None,
          stale: str = "") -> lease.Began:
    """One round trip: the call's journalled outcome, its lease held, or the lease taken
    (then the call counts in flight at the endpoint); `queue_more` adds reads to it."""
    settings = get_settings()
    batch = Batch()
    read = lease.queue_begin(batch, call_key, settings.task_time_limit_s + 5, stale)
    queue_call_started(batch, endpoint.id, call_key)
    if queue_more is not None:
        queue_more(batch)
    batch.send()
    began = read()
    if began.state != "acquired":
        call_abandoned(endpoint.id, call_key)
    return began


def wait_for_holder(call_key: str, endpoint: Endpoint, holder: str, wait_s: float
                    ) -> lease.Began:
    """Wait (up to `wait_s`) for the delivery holding the lease to journal the call; take
    the lease over if it expires or its holder died on this host. Still `held` after
    `wait_s`: the caller retries later rather than pin a worker slot."""
    deadline = time.monotonic() + wait_s
    began = lease.Began("held", holder, call_key)
    while began.state == "held" and time.monotonic() < deadline:
        stale = began.value if lease.holder_is_dead(began.value) else ""
        if not stale:
            time.sleep(WAIT_POLL_S)
        began = begin(call_key, endpoint, stale=stale)
    return began


def give_back_uncalled(call_key: str, token: str, endpoint_id: str) -> None:
    """After an outage that stopped a call before the provider was called: the lease back,
    so that the task's retry takes it at once instead of finding it held by this live
    process until it expires, and the call out of the endpoint's calls in flight. Best
    effort: when the outage is Redis's own, the lease expires as it would have."""
    try:
        batch = Batch()
        lease.queue_release(batch, call_key, token)
        batch.send()
        call_abandoned(endpoint_id, call_key)
    except redis.RedisError:
        pass


def recover(message: AiMessage, endpoint: Endpoint, began: lease.Began, metered: bool
            ) -> CallResult:
    """The outcome an earlier delivery journalled; settled (idempotently) if metered,
    the settlement keeping the journal entry."""
    stored = journal.load(began.value)
    entry, kept = journal.from_json(stored), durable.to_keep(stored)
    if entry.completion is None:
        error = ProviderError(str(entry.error.get("message", "call failed")) if entry.error
                              else "call failed", entry.error or {})
        if metered:
            settle(began.charged_key, 0, 0, entry=kept)
        attempt = Attempt(endpoint_id=endpoint.id, ok=False, latency_ms=0.0,
                          error=error.to_dict())
        return CallResult(attempt, None, error, 0)
    done = entry.completion
    if metered:
        settle(began.charged_key, done.input_tokens + done.output_tokens, entry.cost_nusd,
               kind="call" if done.usage_known else "estimated", entry=kept)
    if message.stream:  # the client may lack some of it: the relay skips what it has
        replay(message.id, began.charged_key, endpoint.id, endpoint.model, done.text)
    return CallResult(Attempt(endpoint_id=endpoint.id, ok=True, latency_ms=0.0), done, None,
                      entry.cost_nusd, estimated=not done.usage_known)


def make_call(message: AiMessage, endpoint: Endpoint, call_key: str, began: lease.Began, *,
              metered: bool, tail: Batch, cancel: threading.Event | None = None
              ) -> CallResult:
    """Holding the lease: make the call and charge it exactly once. The call's records
    and the lease's release go on `tail`, which the caller sends before the task ends;
    a metered call's journal is sent before it is settled. `cancel` set aborts the call
    (a raced message's call whose race another call won): charged as `aborted`."""
    try:
        taken = _take_over(message, endpoint, call_key, began) if metered else (call_key, 0)
    except AimeshError:
        raise  # the caller gives the lease back
    except Exception:  # an outage (a pool with every connection busy, say): nothing called
        give_back_uncalled(call_key, began.value, endpoint.id)
        raise
    if isinstance(taken, CallResult):
        return taken
    charged_key, lost_nusd = taken
    attempt, completion, error = _call(message, endpoint, charged_key, cancel)
    estimate: Estimate | None = None
    if completion is not None and not completion.usage_known:
        completion, cost_nusd = _estimated(message, endpoint, completion)
    elif completion is not None:
        cost_nusd = cost_of(endpoint, completion)
    elif error is not None and error.fields.get("maybe_billed"):
        # The request reached the provider (an unreadable 200, a timeout or a connection
        # lost after sending): we cannot know what it billed, so the worst case; an
        # aborted stream, what the provider reported before the abort if it did.
        estimate = aborted_charge(message, endpoint, error) or worst_case(message, endpoint)
        cost_nusd = estimate.nusd
    else:
        cost_nusd = 0
    before_settle = Batch() if metered else tail
    if error is not None and error.fields.get("reason") == "cancelled":
        # Aborted (a lost race, a client gone): its latency is where it was cut, not the
        # endpoint's, and would pull the live p50/p95 (a hedge's delay) down.
        queue_call_abandoned(before_settle, endpoint.id, call_key)
    else:
        healthy = error is None or not error.endpoint_fault
        queue_call_finished(before_settle, endpoint.id, call_key, attempt.latency_ms,
                            healthy)
    entry = (journal.answered(completion, cost_nusd) if completion is not None
             else journal.failed(error.to_dict()) if error is not None else None)
    if entry is not None:
        journal.queue_keep(before_settle, charged_key, entry)
    if metered:
        before_settle.send()
        failpoint("before_settle", message.agent_id)
        _settle(charged_key, completion, estimate, cost_nusd, _unknown_usage_kind(error),
                durable.to_keep(entry))
    lease.queue_release(tail, call_key, began.value)
    _record_attempt(message, endpoint, attempt, completion, cost_nusd, tail)
    events.call_finished.send(sender=make_call, message=message, endpoint=endpoint,
                              attempt=attempt, completion=completion, cost_nusd=cost_nusd)
    estimated = (completion is not None and not completion.usage_known) or estimate is not None
    return CallResult(attempt, completion, error, cost_nusd + lost_nusd, estimated)


def _unknown_usage_kind(error: ProviderError | None) -> str:
    """The ledger kind of a call charged without the provider's usage."""
    reason = error.fields.get("reason") if error is not None else None
    return {"malformed_response": "estimated", "cancelled": ABORTED}.get(str(reason), "lost")


def _settle(charged_key: str, completion: Completion | None, estimate: Estimate | None,
            cost_nusd: int, estimate_kind: str, kept: dict[str, Any] | None) -> None:
    if completion is not None:
        settle(charged_key, completion.input_tokens + completion.output_tokens, cost_nusd,
               kind="call" if completion.usage_known else "estimated", entry=kept)
    elif estimate is not None:
        settle(charged_key, estimate.tokens, estimate.nusd, kind=estimate_kind, entry=kept)
    else:
        settle(charged_key, 0, 0, entry=kept)


def build_result(message: AiMessage, endpoint: Endpoint, completion: Completion,
                 attempts: list[Attempt], started_at: datetime, charged_nusd: int,
                 queue_position: int | None = None) -> AiResult:
    """The AiResult of a successful call; `charged_nusd` is the message's whole charge,
    `queue_position` the messages ahead of it in a saturated endpoint's queue."""
    finished_at = utcnow()
    return AiResult(
        message_id=message.id,
        agent_id=message.agent_id,
        text=completion.text,
        finish_reason=completion.finish_reason,
        endpoint_id=endpoint.id,
        model=completion.model or endpoint.model,
        input_tokens=completion.input_tokens,
        output_tokens=completion.output_tokens,
        cost_usd=nusd_to_usd(cost_of(endpoint, completion)),
        charged_usd=nusd_to_usd(charged_nusd),
        usage_estimated=not completion.usage_known,
        queue_wait_ms=round((started_at - message.submitted_at).total_seconds() * 1000, 3),
        processing_ms=round((finished_at - started_at).total_seconds() * 1000, 3),
        request_id=completion.request_id,
        submitted_at=message.submitted_at,
        started_at=started_at,
        finished_at=finished_at,
        attempts=attempts,
        metadata=message.metadata,
        queue_position=queue_position,
    )


