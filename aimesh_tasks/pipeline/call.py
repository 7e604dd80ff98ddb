"""Call one endpoint for a message: budget claim, the call, journal, settlement, records."""

from __future__ import annotations

import time
import uuid
from dataclasses import asdict
from datetime import datetime
from typing import Any

from aimesh_tasks import events, keys, outbox
from aimesh_tasks.budgets.estimate import worst_case
from aimesh_tasks.budgets.ledger import claim, estimate_of, reserve, settle
from aimesh_tasks.errors import ProviderError
from aimesh_tasks.failpoints import failpoint
from aimesh_tasks.messages import AiMessage, AiResult, Attempt, utcnow
from aimesh_tasks.money import call_cost_nusd, nusd_to_usd
from aimesh_tasks.pipeline import journal
from aimesh_tasks.providers.base import Completion
from aimesh_tasks.providers.http import call_provider
from aimesh_tasks.redis_batch import Batch
from aimesh_tasks.registry.endpoints import Endpoint
from aimesh_tasks.registry.live import call_abandoned, queue_call_finished, queue_call_started


def endpoint_to_args(endpoint: Endpoint) -> dict[str, Any]:
    """An endpoint as a JSON-safe task argument."""
    return {**asdict(endpoint), "tags": sorted(endpoint.tags)}


def endpoint_from_args(data: dict[str, Any]) -> Endpoint:
    """The endpoint carried in a task argument."""
    return Endpoint(**{**data, "tags": frozenset(data.get("tags", ()))})


def cost_of(endpoint: Endpoint, completion: Completion) -> int:
    """What a completion cost at the endpoint's prices, in nano-USD."""
    return call_cost_nusd(completion.input_tokens, completion.output_tokens,
                          endpoint.input_nusd_per_1k, endpoint.output_nusd_per_1k)


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


def _claimed_key(message: AiMessage, endpoint: Endpoint, call_key: str) -> str:
    """Claim the call's reservation (reserving again if it was released or never made);
    the key to call under. A claim found from an earlier delivery means the provider may
    have been called then: that call is charged at its estimate and a new key is used."""
    state = claim(call_key)
    if state == "claimed":
        return call_key
    if state == "called_before":
        held = estimate_of(call_key)
        if held is not None:
            settle(call_key, held.tokens, held.nusd, kind="lost")
    if state in ("called_before", "settled"):
        call_key = f"{call_key}:redo-{uuid.uuid4().hex[:8]}"
    reserve(message.agent_id, message.id, endpoint.id, call_key, worst_case(message, endpoint))
    claim(call_key)
    return call_key


def _call(message: AiMessage, endpoint: Endpoint, call_key: str
          ) -> tuple[Attempt, Completion | None, ProviderError | None]:
    started = time.perf_counter()
    completion: Completion | None = None
    error: ProviderError | None = None
    try:
        completion = call_provider(endpoint, message, call_key)
    except ProviderError as exc:
        error = exc
    latency_ms = (time.perf_counter() - started) * 1000
    attempt = Attempt(endpoint_id=endpoint.id, ok=error is None, latency_ms=round(latency_ms, 3),
                      error=error.to_dict() if error else None)
    return attempt, completion, error


def _journalled(endpoint: Endpoint, call_key: str) -> tuple[Completion, int] | None:
    """In one round trip: the journalled answer of this call if an earlier delivery made
    it, else nothing, with the call counted in flight at the endpoint."""
    batch = Batch()
    read_journal = journal.queue_lookup(batch, call_key)
    queue_call_started(batch, endpoint.id, call_key)
    batch.send()
    journalled = read_journal()
    if journalled is not None:
        call_abandoned(endpoint.id, call_key)
    return journalled


def attempt_call(message: AiMessage, endpoint: Endpoint, attempt_no: int, *, metered: bool,
                 tail: Batch) -> tuple[Attempt, Completion | None, ProviderError | None]:
    """Make (or, after a redelivery, recover) one call and charge it exactly once. The
    call's records go on `tail`, which the caller must send before the task ends; a
    metered call's journal and live figures are sent before it is settled."""
    call_key = keys.call_key(message.id, attempt_no)
    journalled = _journalled(endpoint, call_key)
    if journalled is not None:  # an earlier delivery made this call; settle it, don't repeat
        done, paid_nusd = journalled
        if metered:
            settle(call_key, done.input_tokens + done.output_tokens, paid_nusd)
        return Attempt(endpoint_id=endpoint.id, ok=True, latency_ms=0.0), done, None
    charged_key = _claimed_key(message, endpoint, call_key) if metered else call_key
    attempt, completion, error = _call(message, endpoint, charged_key)
    cost_nusd = cost_of(endpoint, completion) if completion else 0
    before_settle = Batch() if metered else tail
    queue_call_finished(before_settle, endpoint.id, call_key, attempt.latency_ms, attempt.ok)
    if completion is not None:
        journal.queue_record(before_settle, charged_key, completion, cost_nusd)
    if metered:
        before_settle.send()
        failpoint("before_settle", message.agent_id)
        used = completion.input_tokens + completion.output_tokens if completion else 0
        settle(charged_key, used, cost_nusd)
    _record_attempt(message, endpoint, attempt, completion, cost_nusd, tail)
    events.call_finished.send(sender=attempt_call, message=message, endpoint=endpoint,
                              attempt=attempt, completion=completion, cost_nusd=cost_nusd)
    return attempt, completion, error


def build_result(message: AiMessage, endpoint: Endpoint, completion: Completion,
                 attempts: list[Attempt], started_at: datetime) -> AiResult:
    """The AiResult of a successful call."""
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
        queue_wait_ms=round((started_at - message.submitted_at).total_seconds() * 1000, 3),
        processing_ms=round((finished_at - started_at).total_seconds() * 1000, 3),
        request_id=completion.request_id,
        submitted_at=message.submitted_at,
        started_at=started_at,
        finished_at=finished_at,
        attempts=attempts,
        metadata=message.metadata,
    )
