"""Route one message: read the registry and live figures, decide, record the decision."""

from __future__ import annotations

import time

from aimesh_tasks import events
from aimesh_tasks.errors import NoEndpointAvailable
from aimesh_tasks.messages import AiMessage
from aimesh_tasks.registry.cache import ENDPOINTS
from aimesh_tasks.registry.live import read_figures
from aimesh_tasks.routing.decisions import record_decision
from aimesh_tasks.routing.selection import RoutingDecision, decide
from aimesh_tasks.settings import get_settings


def plan_route(message: AiMessage) -> RoutingDecision:
    """The ranked endpoints for `message`, recorded; NoEndpointAvailable (recorded) if none."""
    settings = get_settings()
    # One round trip reads the registry version and every known endpoint's figures; if the
    # version moved, the endpoint list is reloaded and the figures read again for it.
    figures, version = read_figures(ENDPOINTS.ids())
    endpoints = ENDPOINTS.at(version)
    if set(figures) != {e.id for e in endpoints}:
        figures, _ = read_figures(e.id for e in endpoints)
    try:
        decision = decide(
            message,
            endpoints,
            figures,
            weights=settings.route_weights,
            now=time.time(),
            health_retry_s=settings.health_retry_s,
        )
    except NoEndpointAvailable as exc:
        record_decision(
            {
                "message_id": message.id,
                "agent_id": message.agent_id,
                "winner": None,
                "fallbacks": [],
                "candidates": [],
                "excluded": exc.excluded,
                "weights": dict(zip(("cost", "load", "latency"), settings.route_weights,
                                    strict=True)),
            },
            error=exc.message[:512],
        )
        events.routing_failed.send(sender=plan_route, message=message, error=exc)
        raise
    record_decision(decision.to_record())
    events.message_routed.send(sender=plan_route, message=message, decision=decision)
    return decision

