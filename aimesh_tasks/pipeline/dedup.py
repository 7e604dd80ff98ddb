"""Dedup on the message path: answer from cache, join an identical call, or lead one."""

from __future__ import annotations

from collections.abc import Callable
from decimal import Decimal
from typing import Any

from aimesh_tasks.dedup import cache
from aimesh_tasks.dedup.request_key import cache_scope, request_key
from aimesh_tasks.governance.audit import audit
from aimesh_tasks.messages import AiMessage, AiResult, utcnow
from aimesh_tasks.money import usd_to_nusd
from aimesh_tasks.pipeline import semantic
from aimesh_tasks.redis_batch import Batch, Reader
from aimesh_tasks.settings import get_settings

Flight = tuple[cache.Joined, dict[str, Any]]


def queue_join_flight(batch: Batch, message: AiMessage, task_id: str, *,
                      may_follow: bool = True) -> Reader[Flight]:
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

    def read() -> Flight:
        joined = read_joined()
        if joined.decision == "hit":
            return joined, {}
        plan = {"key": key, "token": joined.token, "store": not message.no_store,
                "ttl_s": message.cache_ttl_s or settings.dedup_ttl_secs, "scope": scope}
        if semantic.enabled_for(message.agent_id):
            plan["semantic_text"] = semantic.prompt_text(message)
        return joined, plan

    return read


def semantic_answer(message: AiMessage, plan: dict[str, Any]) -> dict[str, Any] | None:
    """For a leader whose agent has the semantic cache on: an equivalent prompt's answer,
    re-issued for this message (cached=True), or None."""
    if "semantic_text" not in plan or message.no_cache:
        return None
    found = semantic.lookup(message, plan["scope"])
    return None if found is None else _reissued(found, message, cached=True)


def _reissued(result: dict[str, Any], message: AiMessage, **flags: bool) -> dict[str, Any]:
    original = AiResult.model_validate(result)
    now = utcnow()
    return original.model_copy(update={
        "message_id": message.id, "agent_id": message.agent_id, "metadata": message.metadata,
        "cost_usd": Decimal(0), "cost_saved_usd": original.cost_usd + original.cost_saved_usd,
        "submitted_at": message.submitted_at, "started_at": now, "finished_at": now,
        "queue_wait_ms": round((now - message.submitted_at).total_seconds() * 1000, 3),
        "processing_ms": 0.0, "attempts": [], "cached": False, "dedup": False, **flags,
    }).to_json_dict()


def answer_from_cache(message: AiMessage, cached: dict[str, Any]) -> dict[str, Any]:
    """The cached answer, re-issued for this message: no call made, nothing charged."""
    result = _reissued(cached, message, cached=True)
    audit("cached", message_id=message.id, agent_id=message.agent_id,
          endpoint_id=result["endpoint_id"], reason="exact",
          detail={"cost_saved_nusd": usd_to_nusd(result["cost_saved_usd"])})
    return result


def answer_for_follower(result: dict[str, Any], follower: dict[str, Any]) -> dict[str, Any]:
    """The leader's answer, re-issued (and audited) for a follower that joined its flight."""
    message = AiMessage.model_validate(follower["message"])
    answer = _reissued(result, message, dedup=True)
    audit("cached", message_id=message.id, agent_id=message.agent_id,
          endpoint_id=answer["endpoint_id"], reason="single_flight",
          detail={"cost_saved_nusd": usd_to_nusd(answer["cost_saved_usd"])})
    return answer


def queue_finish_flight(batch: Batch, plan: dict[str, Any], result: AiResult | None
                        ) -> Callable[[], list[dict[str, Any]]]:
    """Queue ending the flight, storing the answer unless it is an error, truncated or
    no_store. Call the returned function once the batch is sent: it remembers the prompt
    for the semantic cache (when on) and gives the followers to answer."""
    storable = (result is not None and plan["store"] and result.finish_reason != "length")
    stored = result.to_json_dict() if storable and result is not None else None
    ttl_s = int(plan["ttl_s"])
    read_followers = cache.queue_finish(batch, plan["key"], plan["token"], stored, ttl_s)

    def finished() -> list[dict[str, Any]]:
        if stored is not None and "semantic_text" in plan:
            semantic.remember(plan["semantic_text"], plan["scope"], plan["key"], ttl_s)
        return read_followers()

    return finished
