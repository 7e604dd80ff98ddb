"""Route one message: read the registry and live figures, decide, record."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from aimesh_tasks import events
from aimesh_tasks.budgets.metered import queue_is_metered
from aimesh_tasks.errors import NoEndpointAvailable
from aimesh_tasks.governance.audit import audit
from aimesh_tasks.messages import AiMessage
from aimesh_tasks.policies import with_exclusions
from aimesh_tasks.redis_batch import Batch, Reader
from aimesh_tasks.registry.cache import ENDPOINTS
from aimesh_tasks.registry.endpoints import Endpoint
from aimesh_tasks.registry.live import LiveFigures, queue_figures, read_figures
from aimesh_tasks.routing.decisions import record_decision
from aimesh_tasks.routing.selection import RoutingDecision, decide
from aimesh_tasks.settings import get_settings


def _weights_record() -> dict[str, float]:
    return dict(zip(("cost", "load", "latency"), get_settings().route_weights, strict=True))


@dataclass(frozen=True, slots=True)
class RouteInputs:
    """What routing reads from Redis: live figures, the registry version they were read
    at, and whether the agent is metered (None: the mirror cannot say)."""

    figures: dict[str, LiveFigures]
    version: str
    metered: bool | None


def queue_route_inputs(batch: Batch, message: AiMessage) -> Reader[RouteInputs]:
    """Queue reading the routing inputs for `message` on a batch."""
    read_figures_of = queue_figures(batch, ENDPOINTS.ids())
    read_metered = queue_is_metered(batch, message.agent_id)

    def read() -> RouteInputs:
        figures, version = read_figures_of()
        return RouteInputs(figures, version, read_metered())

    return read


def plan_route(message: AiMessage, inputs: RouteInputs, records: Batch,
               choose: Callable[[list[Endpoint]], list[Endpoint]] | None = None,
               notes: dict[str, Any] | None = None) -> RoutingDecision:
    """The ranked endpoints for `message` among the candidates `choose` leaves (all, by
    default), recorded on `records` (the caller sends it) with what policies noted;
    NoEndpointAvailable (recorded and sent) if none."""
    settings = get_settings()
    figures = inputs.figures
    endpoints = ENDPOINTS.at(inputs.version)
    if set(figures) != {e.id for e in endpoints}:  # the registry moved: read its figures
        figures, _ = read_figures(e.id for e in endpoints)
    chosen = choose(list(endpoints)) if choose is not None else list(endpoints)
    left_out = dict(getattr(chosen, "excluded", {}))  # why policies left endpoints out
    try:
        decision = decide(message, tuple(chosen), figures, weights=settings.route_weights,
                          now=time.time(), health_retry_s=settings.health_retry_s)
    except NoEndpointAvailable as caught:
        exc = with_exclusions(caught, left_out)
        record_decision(
            {"message_id": message.id, "agent_id": message.agent_id, "winner": None,
             "fallbacks": [], "candidates": [], "excluded": exc.excluded,
             "weights": _weights_record()},
            error=exc.message[:512], batch=records,
        )
        audit("failed", message_id=message.id, agent_id=message.agent_id, reason=exc.message,
              detail={"excluded": exc.excluded}, batch=records)
        records.send()
        events.routing_failed.send(sender=plan_route, message=message, error=exc)
        raise exc from None
    decision.excluded.update(left_out)
    record = decision.to_record()
    record_decision(record, batch=records)
    audit("routed", message_id=message.id, agent_id=message.agent_id,
          endpoint_id=decision.winner.id,
          detail={"fallbacks": record["fallbacks"],
                  "scores": {c["endpoint_id"]: c["score"] for c in record["candidates"]},
                  **(notes or {})},
          batch=records)
    events.message_routed.send(sender=plan_route, message=message, decision=decision)
    return decision
