"""Self-registered endpoints as a policy: routed to while a server lives, called only by one.

| hook              | what it does                                                           |
|-------------------|------------------------------------------------------------------------|
| queue_route_reads | each self-registered endpoint's newest heartbeat, on routing's one      |
|                   | round trip (registry/servers.py)                                       |
| choose            | leaves out a self-registered endpoint whose newest heartbeat is older  |
|                   | than AIMESH_SERVE_DOWN_AFTER_S (`no_servers: ...` in the decision's    |
|                   | excluded), so its messages go to the next candidates                   |
| before_call       | refuses a call at a self-registered endpoint on a worker that does not |
|                   | serve it (`not_served_here`, never called, falls back): its URL is its |
|                   | servers' (a local vLLM beside one of them), not this worker's          |

An operator's endpoint (`aimesh endpoints add`) is never left out here, whether or not an
announcing worker serves it too: it is routable as it always was.

The refusal is what drains a queue whose servers are all gone: routers and registry
followers consume it meanwhile (aimesh_tasks/follow.py), and each message it held falls
back by the normal rules, to the next endpoint of its route, or fails naming why.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from aimesh_tasks.errors import ProviderError
from aimesh_tasks.messages import AiMessage
from aimesh_tasks.policies import CallContext, Chosen, Policy, RouteContext
from aimesh_tasks.redis_batch import Batch, Reader
from aimesh_tasks.registry.cache import ENDPOINTS
from aimesh_tasks.registry.endpoints import Endpoint
from aimesh_tasks.registry.servers import Server, newest, queue_newest
from aimesh_tasks.settings import get_settings


class LiveServers(Policy):
    """Leave out self-registered endpoints with no live server; call them only from one."""

    name = "servers"

    def __init__(self, down_after_s: float | None = None,
                 serves: frozenset[str] | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        settings = get_settings()
        self.down_after_s = settings.serve_down_after_s if down_after_s is None else down_after_s
        self.serves = settings.served_endpoints if serves is None else serves
        self.clock = clock

    def queue_route_reads(self, batch: Batch, message: AiMessage
                          ) -> Reader[dict[str, Server | None]]:
        return queue_newest(batch, ENDPOINTS.announced_ids())

    def choose(self, ctx: RouteContext, candidates: list[Endpoint]) -> list[Endpoint]:
        announced = [e.id for e in candidates if e.announced]
        if not announced:
            return candidates
        seen: dict[str, Server | None] = dict(ctx.reads.get(self.name) or {})
        missing = [i for i in announced if i not in seen]
        if missing:  # the registry moved since this process last loaded it
            seen.update(newest(missing))
        now = self.clock()
        excluded = {i: why for i in announced
                    if (why := self.exclusion(seen[i], now)) is not None}
        return Chosen([e for e in candidates if e.id not in excluded], excluded)

    def exclusion(self, server: Server | None, now: float) -> str | None:
        """Why routing leaves a self-registered endpoint out, or None if a server lives."""
        if server is None:
            return "no_servers: no worker serves it (none announced it lately)"
        if server.live(now, self.down_after_s):
            return None
        return (f"no_servers: no live worker serves it (last heartbeat {now - server.last_seen:.1f}"
                f" s ago, from {server.worker}; down after {self.down_after_s:g} s)")

    def before_call(self, ctx: CallContext) -> float | None:
        if ctx.endpoint.announced and ctx.endpoint.id not in self.serves:
            raise not_served_here(ctx.endpoint.id)
        return None


def not_served_here(endpoint_id: str) -> ProviderError:
    """The refusal of a call at a self-registered endpoint on a worker that does not serve
    it: no call was made, and another endpoint may take it (action 'fallback')."""
    return ProviderError(
        f"endpoint '{endpoint_id}' was not called: it is self-registered, and only the "
        "workers serving it call it (`aimesh worker --serve`); this worker does not. Its "
        "queue is drained here while none of its servers lives",
        endpoint_id=endpoint_id, action="fallback", reason="not_served_here",
        retryable=True, called=False)
