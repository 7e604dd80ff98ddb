"""The routes policy: which route a message is for, and its candidate endpoints.

With no route defined, messages route over every endpoint as before. Once routes exist,
every message must resolve to one (otherwise an agent could skip a restricted route's ACL
by naming none): the route named in its metadata ('aimesh.route'), else the one its intent
matches (governance/intents.py). `choose` then leaves routing only the route's target.
The resolution is made once per message and shared with the ACL (`resolve_once`); it is
audited as `route_matched` with every route's score.
"""

from __future__ import annotations

from typing import Any

from aimesh_tasks.errors import NoEndpointAvailable, NoRouteMatches
from aimesh_tasks.governance.audit import audit
from aimesh_tasks.governance.intents import INDEX, IntentMatch, intent_text, pick
from aimesh_tasks.governance.routes import Route
from aimesh_tasks.governance.table import TABLE, GovernanceTable, queue_table
from aimesh_tasks.messages import ROUTE_KEY, AiMessage
from aimesh_tasks.policies.base import Policy, RouteContext
from aimesh_tasks.redis_batch import Batch, Reader
from aimesh_tasks.registry.endpoints import Endpoint
from aimesh_tasks.settings import get_settings

RESOLVED = "route"  # where the resolution is kept in ctx.reads


def _named(message: AiMessage, table: GovernanceTable) -> IntentMatch | None:
    name = message.metadata.get(ROUTE_KEY)
    if name is None:
        return None
    if name not in table.routes:
        raise NoRouteMatches(f"metadata 'aimesh.route': route '{name}' is not defined; "
                             "`aimesh routes list` shows the routes", route=str(name),
                             policy=RouteSelection.name)
    return IntentMatch(str(name), "name", {})


def resolve(message: AiMessage, table: GovernanceTable) -> IntentMatch | None:
    """The route of a message (None: no route is defined, every endpoint may serve it);
    Ambiguous or NoRouteMatches when it has none."""
    if not table.routes:
        return None
    named = _named(message, table)
    if named is not None:
        return named
    settings = get_settings()
    scores = INDEX.scores(intent_text(message), table.routes)
    return pick(scores, table.routes, min_score=settings.intent_min_score,
                ambiguity_threshold=settings.intent_ambiguity_threshold)


def resolve_once(ctx: RouteContext, table: GovernanceTable | None = None
                 ) -> tuple[Route | None, IntentMatch | None]:
    """The message's route, resolved on first ask and kept in the context."""
    if RESOLVED not in ctx.reads:
        table = table or TABLE.current()
        match = resolve(ctx.message, table)
        route = table.routes[match.route] if match is not None else None
        ctx.reads[RESOLVED] = (route, match)
        if match is not None:
            audit("route_matched", message_id=ctx.message.id, agent_id=ctx.message.agent_id,
                  detail={"route": match.route, "via": match.via, "scores": match.scores})
    resolved: tuple[Route | None, IntentMatch | None] = ctx.reads[RESOLVED]
    return resolved


class RouteSelection(Policy):
    """Resolve the message's route before routing; score only its target's endpoints."""

    name = "routes"

    def queue_route_reads(self, batch: Batch, message: AiMessage) -> Reader[Any]:
        return queue_table(batch)

    def before_route(self, ctx: RouteContext) -> None:
        resolve_once(ctx, ctx.reads.get(self.name))

    def choose(self, ctx: RouteContext, candidates: list[Endpoint]) -> list[Endpoint]:
        route, _ = resolve_once(ctx, ctx.reads.get(self.name))
        if route is None:
            return candidates
        kept = [e for e in candidates if route.target.admits(e)]
        if not kept:
            target = ", ".join(f"{k}: {v}" for k, v in route.target.to_dict().items())
            error = NoEndpointAvailable(
                f"route '{route.name}' targets {target}, and no registered endpoint is in "
                "that target; add one or change the route's target", route=route.name,
                excluded={e.id: f"not in route '{route.name}'" for e in candidates})
            audit("failed", message_id=ctx.message.id, agent_id=ctx.message.agent_id,
                  reason=error.message, detail={"route": route.name})
            raise error
        return kept
