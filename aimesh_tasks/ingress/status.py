"""The seed's own routes: /healthz, /v1/status, /v1/providers, /v1/routes, /v1/agents,
and POST /v1/cache/clear (admin).

/healthz answers while the process serves (a liveness probe: no server is asked).
/v1/status reads the registry, the live figures, the broker's queue depths and pings the
workers (0.5 s), so it costs a few round trips: for operators, not for every request.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from starlette.concurrency import run_in_threadpool

from aimesh_tasks import keys
from aimesh_tasks.ingress.auth import AdminDep, Caller, CallerDep
from aimesh_tasks.registry.endpoints import list_endpoints
from aimesh_tasks.registry.live import read_figures
from aimesh_tasks.settings import get_settings

router = APIRouter(tags=["aimesh"])
PING_TIMEOUT_S = 0.5


@router.get("/healthz")
async def healthz() -> dict[str, str]:
    """Liveness: the process serves requests."""
    return {"status": "ok"}


def _depths(queues: list[str]) -> dict[str, int] | None:
    from aimesh_tasks.observability.exporter import broker_client, queue_depths

    url = get_settings().broker_url
    if not url.startswith(("redis://", "rediss://")):
        return None
    broker = broker_client(url)
    try:
        return queue_depths(broker, queues)
    finally:
        broker.close()


def _workers() -> list[str]:
    from aimesh_tasks.app import app

    replies = app.control.ping(timeout=PING_TIMEOUT_S) or []
    return sorted(name for reply in replies for name in reply)


def cluster_status() -> dict[str, Any]:
    """Endpoints with their live figures and queue depth, the routing queue's depth, and
    the workers that answered a ping."""
    endpoints = list_endpoints()
    figures, _ = read_figures(e.id for e in endpoints)
    depths = _depths([keys.ROUTE_QUEUE, *(e.queue for e in endpoints)]) or {}
    return {
        "object": "aimesh.status",
        "route_queue_depth": depths.get(keys.ROUTE_QUEUE),
        "endpoints": [{"id": e.id, "provider": e.provider, "model": e.model,
                       "enabled": e.enabled, "capacity": e.capacity,
                       "queue_depth": depths.get(e.queue), **figures[e.id].to_dict()}
                      for e in endpoints],
        "workers": _workers(),
    }


@router.get("/v1/status")
async def status(_: AdminDep) -> dict[str, Any]:
    """Endpoints, queue depths, health and workers seen (admin keys only)."""
    return await run_in_threadpool(cluster_status)


def providers_view() -> dict[str, Any]:
    from aimesh_tasks.providers import PROVIDERS

    endpoints = list_endpoints(include_disabled=False)
    return {"object": "list", "data": [
        {"id": kind, "object": "aimesh.provider",
         "endpoints": sorted(e.id for e in endpoints if e.provider == kind)}
        for kind in sorted(PROVIDERS)]}


@router.get("/v1/providers")
async def providers(_: CallerDep) -> dict[str, Any]:
    """The provider kinds this cluster speaks, and the enabled endpoints of each."""
    return await run_in_threadpool(providers_view)


def agents_view(who: Caller) -> dict[str, Any]:
    from aimesh_tasks.governance.agents import list_agents

    agents = list_agents()
    if not who.admin:
        agents = [a for a in agents if a.id in who.key.agents]
    return {"object": "list", "data": [a.to_dict() for a in agents],
            "caller": {"agent_id": who.agent_id, "acts_for": list(who.key.agents),
                       "admin": who.admin}}


@router.get("/v1/agents")
async def agents(who: CallerDep) -> dict[str, Any]:
    """Registered agents: all of them for an admin key, else those this key acts for."""
    return await run_in_threadpool(agents_view, who)


def routes_view(who: Caller) -> dict[str, Any]:
    from aimesh_tasks.governance.routes import list_routes

    def usable(allowed: tuple[str, ...] | None) -> bool:
        return allowed is None or "*" in allowed or bool(set(allowed) & set(who.key.agents))

    routes = [r for r in list_routes() if who.admin or usable(r.allowed)]
    return {"object": "list", "data": [r.to_dict() for r in routes]}


@router.get("/v1/routes")
async def routes(who: CallerDep) -> dict[str, Any]:
    """Governance routes: all for an admin key, else those the key's agents may use."""
    return await run_in_threadpool(routes_view, who)


@router.post("/v1/cache/clear")
async def clear_cache(_: AdminDep) -> dict[str, Any]:
    """Delete every cached answer, exact and semantic (admin keys only)."""
    from aimesh_tasks.cache_admin import clear_cache as clear

    return {"object": "aimesh.cache_cleared", "deleted": await run_in_threadpool(clear)}
