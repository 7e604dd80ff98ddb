"""Dedup on the message path: answer from cache, join an identical call, or lead one."""

from __future__ import annotations

from collections.abc import Callable
from decimal import Decimal
from typing import Any

from aimesh_tasks.dedup import cache
from aimesh_tasks.dedup.request_key import cache_scope, request_key
from aimesh_tasks.envelope import Flight
from aimesh_tasks.governance.audit import audit
from aimesh_tasks.messages import AiMessage, AiResult, utcnow
from aimesh_tasks.money import usd_to_nusd
from aimesh_tasks.pipeline import semantic
from aimesh_tasks.redis_batch import Batch, Reader
from aimesh_tasks.settings import get_settings


def queue_join_flight(batch: Batch, message: AiMessage, task_id: str, *,
                      may_follow: bool = True) -> Reader[tuple[cache.Joined, Flight | None]]:
    """Queue joining the message's flight; the reader gives the decision and the flight
    plan the call task carries. may_follow=False (a task in a canvas): a cache hit still
    answers, but an identical call in flight is not waited for; this message leads its
    own call."""
    settings = get_settings()
    scope = cache_scope(message, settings.cache_group_members)
    key = request_key(message, scope)
    mode: cache.Mode = "lead" if message.no_cache else "follow" if may_follow else "cache"
    read_joined = cache.queue_join(
        batch, key, {"task_id": task_id, "message": message.to_json_dict()},
        lease_s=settings.single_flight_lease_s, mode=mode)

    def read() -> tuple[cache.Joined, Flight | None]:
        joined = read_joined()
        if joined.decision != "lead":
            return joined, None
        text = semantic.prompt_text(message) if semantic.enabled_for(message.agent_id) else None
        return joined, Flight(key=key, token=str(joined.token), store=not message.no_store,
                              ttl_s=message.cache_ttl_s or settings.dedup_ttl_secs,
                              scope=scope, semantic_text=text)

    return read


def semantic_answer(message: AiMessage, flight: Flight) -> dict[str, Any] | None:
    """For a leader whose agent has the semantic cache on: an equivalent prompt's answer,
    re-issued for this message (cached=True), or None."""
    if flight.semantic_text is None or message.no_cache:
        return None
    found = semantic.lookup(message, flight.scope)
    return None if found is None else _reissued(found, message, cached=True)


def _reissued(result: dict[str, Any], message: AiMessage, **flags: bool) -> dict[str, Any]:
    original = AiResult.model_validate(result)
    now = utcnow()
    return original.model_copy(update={
        "message_id": message.id, "agent_id": message.agent_id, "metadata": message.metadata,
        "cost_usd": Decimal(0), "cost_saved_usd": original.cost_usd + original.cost_saved_usd,
        "submitted_at": message.submitted_at, "started_at": now, "finished_at": now,
        "queue_wait_ms": round((now - message.submitted_at).total_seconds() * 1000, 3),
        "processing_ms": 0.0, "attempts": [], "cached": False, "dedup": False,
        "charged_usd": Decimal(0), "usage_estimated": False, **flags,
    }).to_json_dict()


def answer_from_cache(message: AiMessage, cached: dict[str, Any]) -> dict[str, Any]:
    """The cached answer, re-issued for this message: no call made, nothing charged."""
    result = _reissued(cached, message, cached=True)
    audit("cached", message_id=message.id, agent_id=message.agent_id,
          endpoint_id=result["endpoint_id"], reason="exact",
          detail={"cost_saved_nusd": usd_to_nusd(result["cost_saved_usd"])})
    return result


def answer_for_follower(result: dict[str, Any], message: AiMessage) -> dict[str, Any]:
    """The leader's answer, re-issued (and audited) for a follower that joined its flight."""
    answer = _reissued(result, message, dedup=True)
    audit("cached", message_id=message.id, agent_id=message.agent_id,
          endpoint_id=answer["endpoint_id"], reason="single_flight",
          detail={"cost_saved_nusd": usd_to_nusd(answer["cost_saved_usd"])})
    return answer


def queue_finish_flight(batch: Batch, flight: Flight, result: AiResult | None
                        ) -> Callable[[], list[dict[str, Any]]]:
    """Queue ending the flight, storing the answer unless it is an error, truncated,
    estimated or no_store. Call the returned function once the batch is sent: it
    remembers the prompt for the semantic cache (when on) and gives the followers."""
    storable = (result is not None and flight.store and result.finish_reason != "length"
                and not result.usage_estimated)
    stored = result.to_json_dict() if storable and result is not None else None
    read_followers = cache.queue_finish(batch, flight.key, flight.token, stored, flight.ttl_s)

    def finished() -> list[dict[str, Any]]:
        if stored is not None and flight.semantic_text is not None:
            semantic.remember(flight.semantic_text, flight.scope, flight.key, flight.ttl_s)
        return read_followers()

    return finished
