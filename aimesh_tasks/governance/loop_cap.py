"""Loop caps: a chain of agents feeding each other's output stops at AIMESH_MAX_HOPS.

A message fed from another message's output names it in metadata ('aimesh.parent_id');
its hop count is then its parent's plus one (a message from outside the cluster may carry
its count in 'aimesh.hops'; the larger wins). The count is kept in Redis for the message's
own children, computed by one script on routing's round trip, and stable across
redeliveries. Past the cap the message is refused (LoopCapExceeded, audited `denied`) and
dead-lettered once with a record of the chain, before any budget is reserved: two agents
answering each other forever spend at most the cap's worth of calls.
"""

from __future__ import annotations

import json

from aimesh_tasks import keys
from aimesh_tasks.delivery import dead_letters
from aimesh_tasks.errors import LoopCapExceeded
from aimesh_tasks.messages import HOPS_KEY, PARENT_KEY, AiMessage
from aimesh_tasks.policies.base import Policy, RouteContext
from aimesh_tasks.redis_batch import Batch, Reader
from aimesh_tasks.redis_client import get_redis
from aimesh_tasks.settings import get_settings

DEAD_LETTER_REASON = "loop_cap"

# KEYS: this message's hops, its parent's hops. ARGV: carried hops, has a parent (0/1),
# TTL (s). Returns the message's hops (0 for a root message, which stores nothing).
HOPS_LUA = """
local hops = tonumber(ARGV[1])
if ARGV[2] == '1' then
  local parent = tonumber(redis.call('GET', KEYS[2]) or '0')
  if parent + 1 > hops then hops = parent + 1 end
end
local kept = tonumber(redis.call('GET', KEYS[1]) or '-1')
if kept > hops then hops = kept end
if hops > 0 then redis.call('SET', KEYS[1], hops, 'EX', tonumber(ARGV[3])) end
return hops
"""


def queue_hops(batch: Batch, message: AiMessage) -> Reader[int] | None:
    """Queue counting the message's hops (None: a root message, 0 hops, nothing to do)."""
    parent = message.metadata.get(PARENT_KEY)
    carried = int(message.metadata.get(HOPS_KEY) or 0)
    if parent is None and carried == 0:
        return None
    index = batch.script(HOPS_LUA, [keys.hops(message.id), keys.hops(str(parent or ""))],
                         [carried, 1 if parent is not None else 0,
                          get_settings().hops_ttl_s])
    return lambda: int(batch[index])


def _dead_letter_once(message: AiMessage, hops: int, cap: int) -> str | None:
    """Record the refused message in the route queue's dead letters (once per message)."""
    if not get_redis().set(keys.loop_refused(message.id), "1", nx=True,
                           ex=get_settings().hops_ttl_s):
        return None
    entry = dead_letters.add(
        keys.ROUTE_QUEUE, json.dumps(message.to_json_dict()).encode(), DEAD_LETTER_REASON,
        f"{hops} agent-to-agent hops, past AIMESH_MAX_HOPS={cap}; parent "
        f"{message.metadata.get(PARENT_KEY)}", task_id=message.id, task="aimesh.route")
    return entry["id"]


class LoopCap(Policy):
    """Refuse, and dead-letter, a message past the hop cap."""

    name = "loop_cap"

    def queue_route_reads(self, batch: Batch, message: AiMessage) -> Reader[int] | None:
        return queue_hops(batch, message)

    def before_route(self, ctx: RouteContext) -> None:
        hops = ctx.reads.get(self.name)
        cap = get_settings().max_hops
        if hops is None or hops <= cap:
            return
        message = ctx.message
        raise LoopCapExceeded(
            f"message '{message.id}' is {hops} agent-to-agent hops from its origin, past the "
            f"cap of {cap} (AIMESH_MAX_HOPS); it was refused and dead-lettered (`aimesh dead "
            f"list`)", policy=self.name, hops=hops, max_hops=cap, agent_id=message.agent_id,
            parent_id=message.metadata.get(PARENT_KEY),
            dead_letter_id=_dead_letter_once(message, hops, cap))
