"""The ingress's own Prometheus metrics, served at GET /metrics.

| metric                                   | type      | labels                 |
|------------------------------------------|-----------|------------------------|
| aimesh_ingress_requests_total            | counter   | route, method, status  |
| aimesh_ingress_request_duration_seconds  | histogram | route, method          |
| aimesh_ingress_requests_in_progress      | gauge     | (none)                 |

`route` is the matched route's path template (bounded), or 'unmatched'. Duration runs
from the request's arrival to the last byte of the response (a stream included). With
several processes (`aimesh ingress --workers N`) the samples go to
PROMETHEUS_MULTIPROC_DIR and every scrape sums all processes.
"""

from __future__ import annotations

import os
import time

from fastapi import APIRouter
from fastapi.responses import Response
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.multiprocess import MultiProcessCollector
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from aimesh_tasks.observability.metrics import LATENCY_BUCKETS_S

REGISTRY = CollectorRegistry()
REQUESTS = Counter("aimesh_ingress_requests", "HTTP requests answered by the ingress.",
                   ["route", "method", "status"], registry=REGISTRY)
DURATION = Histogram("aimesh_ingress_request_duration_seconds",
                     "Time from a request's arrival to its response's last byte.",
                     ["route", "method"], buckets=LATENCY_BUCKETS_S, registry=REGISTRY)
IN_PROGRESS = Gauge("aimesh_ingress_requests_in_progress", "Requests being answered.",
                    registry=REGISTRY, multiprocess_mode="livesum")
router = APIRouter(tags=["aimesh"])


def _route(scope: Scope) -> str:
    route = scope.get("route")
    path = getattr(route, "path", None)
    return str(path) if path else "unmatched"


class RequestMetrics:
    """ASGI middleware counting and timing every HTTP request."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500

        async def watching_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        IN_PROGRESS.inc()
        try:
            await self.app(scope, receive, watching_send)
        finally:
            IN_PROGRESS.dec()
            route, method = _route(scope), str(scope.get("method", ""))
            REQUESTS.labels(route, method, str(status)).inc()
            DURATION.labels(route, method).observe(time.perf_counter() - started)


def _registry() -> CollectorRegistry:
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        merged = CollectorRegistry()
        MultiProcessCollector(merged)  # type: ignore[no-untyped-call]
        return merged
    return REGISTRY


@router.get("/metrics", response_class=Response)
async def metrics() -> Response:
    """Prometheus text format."""
    return Response(generate_latest(_registry()), media_type=CONTENT_TYPE_LATEST)
