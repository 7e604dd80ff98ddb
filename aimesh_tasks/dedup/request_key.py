"""The request key (pure): blake3 over the canonical JSON of everything that shapes the answer.

Included: the cache scope (the agent, or a named group the agent belongs to), the model
and capability hints, the chat messages, and every output-affecting parameter
(max_tokens, temperature, top_p, stop). Not included: ids, priority, deadline,
metadata, submit time: two messages that differ only in those get the same answer.
"""

from __future__ import annotations

from blake3 import blake3

from aimesh_tasks.messages import AiMessage, canonical_json

KEY_FIELDS = ("model", "capability", "max_tokens", "temperature", "top_p", "stop")


def cache_scope(message: AiMessage, groups: dict[str, frozenset[str]]) -> str:
    """'agent:<id>' by default; 'group:<name>' only if the agent is a member of that group."""
    group = message.cache_group
    if group is not None and message.agent_id in groups.get(group, frozenset()):
        return f"group:{group}"
    return f"agent:{message.agent_id}"


def request_key(message: AiMessage, scope: str) -> str:
    """Hex blake3 digest of the canonical request within its scope."""
    shaping = {name: getattr(message, name) for name in KEY_FIELDS}
    document = {"scope": scope, "messages": message.chat(), **shaping}
    return blake3(canonical_json(document).encode("utf-8")).hexdigest()
