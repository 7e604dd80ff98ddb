"""Route ACLs: who may send a message to a route, checked before any budget or dispatch.

| route's `allowed` | registered agent        | unregistered agent | anonymous    |
|-------------------|-------------------------|--------------------|--------------|
| absent (open)     | yes                     | yes                | yes          |
| '*'               | yes (if enabled)        | Unauthorized (401) | Unauthorized |
| [agents]          | listed and enabled only | Unauthorized (401) | Unauthorized |

A registered agent not on the list, or disabled, gets Forbidden (403). `rule` on the error
names the check that fired; the path audits the refusal as `denied` with it. The ACL
applies the same way whether the message named its route or its intent chose it, and
whichever door it came in by (submit, the CLI, the ingress, or a task pushed straight onto
the route queue): it runs inside the routing task.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from aimesh_tasks.errors import Forbidden, Unauthorized
from aimesh_tasks.governance.route_policy import resolve_once
from aimesh_tasks.governance.routes import ANY_REGISTERED, Route
from aimesh_tasks.governance.table import queue_table
from aimesh_tasks.messages import AiMessage
from aimesh_tasks.policies.base import Policy, RouteContext
from aimesh_tasks.redis_batch import Batch, Reader

ANONYMOUS = "anonymous"  # the agent id of a message no agent vouches for (e.g. no API key)
POLICY = "acl"


def check(route: Route, agent_id: str, agents: Mapping[str, bool]) -> None:
    """Raise Unauthorized or Forbidden if `agent_id` may not use `route` (pure)."""
    if route.open:
        return
    fields = {"policy": POLICY, "route": route.name, "agent_id": agent_id}
    if agent_id == ANONYMOUS:
        raise Unauthorized(f"route '{route.name}' is restricted; anonymous messages may use "
                           "open routes only", rule="anonymous", **fields)
    if agent_id not in agents:
        raise Unauthorized(f"route '{route.name}' is restricted to registered agents, and "
                           f"'{agent_id}' is not one; register it with `aimesh agents add "
                           f"{agent_id}`", rule="unregistered", **fields)
    if not agents[agent_id]:
        raise Forbidden(f"agent '{agent_id}' is disabled", rule="disabled", **fields)
    assert route.allowed is not None
    if route.allowed != (ANY_REGISTERED,) and agent_id not in route.allowed:
        raise Forbidden(f"agent '{agent_id}' may not use route '{route.name}' (allowed: "
                        f"{', '.join(route.allowed)})", rule="not_listed", **fields)


class RouteAcl(Policy):
    """Refuse a message whose agent may not use its route."""

    name = POLICY

    def queue_route_reads(self, batch: Batch, message: AiMessage) -> Reader[Any]:
        return queue_table(batch)

    def before_route(self, ctx: RouteContext) -> None:
        table = ctx.reads[self.name]
        route, _ = resolve_once(ctx, table)
        if route is not None:
            check(route, ctx.message.agent_id, table.agents)
