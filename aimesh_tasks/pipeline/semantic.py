"""The semantic cache on the message path, for the agents it is switched on for.

After an exact-cache miss, a leading message of such an agent asks the semantic cache
for an earlier prompt of the same scope that means the same (embedding similarity, then
the guards); a hit answers from that prompt's cached result. Every answer such a message
stores in the exact cache is also remembered by its prompt's vector. The prompt's text is
kept with the vector (the guards compare texts): switching the cache on for an agent is
the configuration that allows storing its prompts.
"""

from __future__ import annotations

from functools import lru_cache
from typing import TYPE_CHECKING, Any

from aimesh_tasks.dedup import cache
from aimesh_tasks.errors import ConfigError
from aimesh_tasks.governance.audit import audit
from aimesh_tasks.messages import AiMessage
from aimesh_tasks.money import usd_to_nusd
from aimesh_tasks.settings import get_settings

if TYPE_CHECKING:  # numpy and the model come with the optional [semantic] extra
    from aimesh_tasks.dedup.semantic import SemanticCache


def enabled_for(agent_id: str) -> bool:
    """Whether AIMESH_SEMANTIC_AGENTS switches the semantic cache on for this agent."""
    agents = {a.strip() for a in get_settings().semantic_agents.split(",") if a.strip()}
    return "*" in agents or agent_id in agents


def prompt_text(message: AiMessage) -> str:
    """The text the semantic cache compares: every chat message's content, in order."""
    return "\n".join(m.text() for m in message.messages)


@lru_cache(maxsize=4)
def _semantic_cache(threshold: float) -> SemanticCache:
    try:
        from aimesh_tasks.dedup.semantic import SemanticCache
    except ImportError as exc:
        raise ConfigError(
            "AIMESH_SEMANTIC_AGENTS is set but the semantic cache is not installed: "
            "pip install torch==2.13.0 && pip install 'aimesh-tasks[semantic]'",
            setting="AIMESH_SEMANTIC_AGENTS",
        ) from exc
    return SemanticCache(threshold=threshold)


def lookup(message: AiMessage, scope: str) -> dict[str, Any] | None:
    """The cached result of an equivalent earlier prompt, or None."""
    hit = _semantic_cache(get_settings().semantic_threshold).lookup(scope, prompt_text(message))
    if hit is None:
        return None
    result = cache.entry(hit.result_key)
    if result is not None:
        audit("cached", message_id=message.id, agent_id=message.agent_id,
              endpoint_id=result.get("endpoint_id"), reason="semantic",
              detail={"score": round(hit.score, 4), "request_key": hit.result_key,
                      "cost_saved_nusd": usd_to_nusd(result["cost_usd"])
                      + usd_to_nusd(result.get("cost_saved_usd", "0"))})
    return result


def remember(text: str, scope: str, request_key: str, ttl_s: int) -> None:
    """Remember `text` as answered by the exact-cache entry `request_key`."""
    _semantic_cache(get_settings().semantic_threshold).store(scope, text, request_key, ttl_s)
