"""Dedup on the message path: answer from cache, join an identical call, or lead one."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

from aimesh_tasks.dedup import cache
from aimesh_tasks.dedup.request_key import cache_scope, request_key
from aimesh_tasks.governance.audit import audit
from aimesh_tasks.messages import AiMessage, AiResult, utcnow
from aimesh_tasks.money import usd_to_nusd
from aimesh_tasks.pipeline import semantic
from aimesh_tasks.settings import get_settings


def join_flight(message: AiMessage, task_id: str, *, may_follow: bool = True
                ) -> tuple[cache.Joined, dict[str, Any]]:
    """Join the message's flight; the decision and the flight plan the call task carries.
    may_follow=False (a task in a canvas): a cache hit still answers, but an identical
    call in flight is not waited for; this message leads its own call."""
    settings = get_settings()
    scope = cache_scope(message, settings.cache_group_members)
    key = request_key(message, scope)
    hit = None if message.no_cache or may_follow else cache.peek(key)
    if hit is not None:
        return cache.Joined("hit", cached=hit), {}
    joined = cache.join(key, {"task_id": task_id, "message": message.to_json_dict()},
                        lease_s=settings.single_flight_lease_s,
                        lookup=not message.no_cache and may_follow)
    plan = {"key": key, "token": joined.token, "store": not message.no_store,
            "ttl_s": message.cache_ttl_s or settings.dedup_ttl_secs, "scope": scope}
    if semantic.enabled_for(message.agent_id):
        plan["semantic_text"] = semantic.prompt_text(message)
    return joined, plan


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


def finish_flight(plan: dict[str, Any], result: AiResult | None) -> list[dict[str, Any]]:
    """End the flight; store the answer unless it is an error, truncated or no_store."""
    storable = (result is not None and plan["store"] and result.finish_reason != "length")
    stored = result.to_json_dict() if storable and result is not None else None
    followers = cache.finish(plan["key"], plan["token"], stored, int(plan["ttl_s"]))
    if stored is not None and "semantic_text" in plan:
        semantic.remember(plan["semantic_text"], plan["scope"], plan["key"], int(plan["ttl_s"]))
    return followers
