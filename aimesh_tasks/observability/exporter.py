"""The cluster exporter: queue depths from the broker and live figures from Redis.

Run one per cluster (`aimesh metrics --port P`); every figure is read at scrape time, so
any number of replicas report the same values.

| metric                               | labels          | source                        |
|--------------------------------------|-----------------|-------------------------------|
| aimesh_queue_depth_messages          | queue           | LLEN of the queue and of its  |
|                                      |                 | kombu priority sub-queues     |
| aimesh_endpoint_in_flight_calls      | endpoint        | live in-flight set (Redis)    |
| aimesh_endpoint_capacity_calls       | endpoint        | registry                      |
| aimesh_endpoint_live_latency_seconds | endpoint, quantile | live window p50/p99 (Redis) |
| aimesh_endpoint_error_ratio          | endpoint        | live window (Redis)           |
| aimesh_endpoint_health               | endpoint, state | live health (up/down/unknown) |
| aimesh_breaker_state                 | endpoint, state | circuit breaker: 1 for its    |
|                                      |                 | state (closed/open/half_open) |
| aimesh_outbox_records                | state           | records waiting for Postgres  |
|                                      |                 | (waiting) and set aside as    |
|                                      |                 | refused (rejected): outbox.py |
| aimesh_exporter_source_up            | source          | 1 if broker/redis/database    |
|                                      |                 | answered this scrape          |

Queues read: `aimesh.route` and `aimesh.endpoint.<id>` of every endpoint in the registry,
disabled ones included (their queues may still hold messages). Kombu's Redis transport
keeps a message of priority step p in the list `<queue>\\x06\\x16<p>` (step 0 is the plain
list); the steps are the ten of celery_config (aimesh_tasks/resilience/priority.py), so a
queue's depth is the sum of those ten lists.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from typing import Any

import redis
from kombu.transport import redis as kombu_redis
from prometheus_client import CollectorRegistry
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from aimesh_tasks import keys
from aimesh_tasks.errors import ConfigError
from aimesh_tasks.resilience.breaker_store import STATES as BREAKER_STATES
from aimesh_tasks.resilience.breaker_store import breaker_states
from aimesh_tasks.resilience.priority import BROKER_PRIORITY_STEPS
from aimesh_tasks.settings import get_settings

logger = logging.getLogger(__name__)
# The priority sub-queue names of kombu's Redis transport (Channel._q_for_pri), at the
# steps celery_config sets.
PRIORITY_STEPS: tuple[int, ...] = BROKER_PRIORITY_STEPS
PRIORITY_SEP: str = kombu_redis.Channel.sep
HEALTH_STATES = ("up", "down", "unknown")


def priority_lists(queue: str) -> list[str]:
    """The Redis lists kombu uses for `queue`, one per priority step."""
    return [queue if step == 0 else f"{queue}{PRIORITY_SEP}{step}" for step in PRIORITY_STEPS]


def queue_depths(broker: redis.Redis, queues: Iterable[str]) -> dict[str, int]:
    """Messages waiting in each queue (all priority sub-queues), in one round trip."""
    names = list(queues)
    pipe = broker.pipeline(transaction=False)
    for queue in names:
        for name in priority_lists(queue):
            pipe.llen(name)
    replies = pipe.execute()
    steps = len(PRIORITY_STEPS)
    return {q: sum(int(n) for n in replies[i * steps:(i + 1) * steps])
            for i, q in enumerate(names)}


def broker_client(broker_url: str) -> redis.Redis:
    """A Redis client for the broker; ConfigError if the broker is not Redis."""
    if not broker_url.startswith(("redis://", "rediss://", "unix://")):
        raise ConfigError(
            "aimesh metrics reads queue depths with Redis LLEN: AIMESH_BROKER_URL must be "
            f"redis:// or rediss:// (got scheme '{broker_url.split(':', 1)[0]}')",
            setting="AIMESH_BROKER_URL",
        )
    return redis.Redis.from_url(broker_url, socket_timeout=5, socket_connect_timeout=5)


def _gauge(name: str, doc: str, labels: list[str]) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, doc, labels=labels)


class ClusterCollector(Collector):
    """Reads the registry, Redis live figures and broker queue lengths on every scrape."""

    def __init__(self, broker: redis.Redis) -> None:
        self.broker = broker

    def describe(self) -> list[Any]:
        """The metric families, without reading anything (for registration)."""
        return list(self._families().values())

    def _families(self) -> dict[str, GaugeMetricFamily]:
        return {
            "depth": _gauge("aimesh_queue_depth_messages",
                            "Messages waiting in a queue (all priorities).", ["queue"]),
            "in_flight": _gauge("aimesh_endpoint_in_flight_calls",
                                "Calls in flight at an endpoint, all workers.", ["endpoint"]),
            "capacity": _gauge("aimesh_endpoint_capacity_calls",
                               "Most calls in flight an endpoint takes.", ["endpoint"]),
            "latency": _gauge("aimesh_endpoint_live_latency_seconds",
                              "Latency of an endpoint's recent successful calls.",
                              ["endpoint", "quantile"]),
            "errors": _gauge("aimesh_endpoint_error_ratio",
                             "Share of an endpoint's recent calls that failed.", ["endpoint"]),
            "health": _gauge("aimesh_endpoint_health",
                             "1 for the endpoint's current health state.", ["endpoint", "state"]),
            "breaker": _gauge("aimesh_breaker_state",
                              "1 for the state of the endpoint's circuit breaker.",
                              ["endpoint", "state"]),
            "outbox": _gauge("aimesh_outbox_records",
                             "Outbox records waiting to reach Postgres (waiting), and those "
                             "Postgres refused, set aside with the reason (rejected).",
                             ["state"]),
            "up": _gauge("aimesh_exporter_source_up",
                         "1 if the source answered this scrape.", ["source"]),
        }

    def collect(self) -> Iterator[GaugeMetricFamily]:
        """Read everything now; a source that fails is reported down, not raised."""
        families = self._families()
        endpoints = self._endpoints(families["up"])
        self._live(families, endpoints)
        self._depths(families["depth"], families["up"], endpoints)
        yield from families.values()

    def _endpoints(self, up: GaugeMetricFamily) -> list[Any]:
        from aimesh_tasks.registry.endpoints import list_endpoints

        try:
            endpoints = list_endpoints(include_disabled=True)
        except Exception:  # a scrape must answer; the failure shows as source_up 0
            logger.exception("exporter.database_failed")
            up.add_metric(["database"], 0)
            return []
        up.add_metric(["database"], 1)
        return endpoints

    def _live(self, families: dict[str, GaugeMetricFamily], endpoints: list[Any]) -> None:
        from aimesh_tasks import outbox
        from aimesh_tasks.registry.live import read_figures

        try:
            figures, _ = read_figures(e.id for e in endpoints)
            waiting, rejected = outbox.counts()
        except Exception:
            logger.exception("exporter.redis_failed")
            families["up"].add_metric(["redis"], 0)
            return
        families["up"].add_metric(["redis"], 1)
        families["outbox"].add_metric(["waiting"], waiting)
        families["outbox"].add_metric(["rejected"], rejected)
        for endpoint in endpoints:
            live = figures[endpoint.id]
            families["in_flight"].add_metric([endpoint.id], live.in_flight)
            families["capacity"].add_metric([endpoint.id], endpoint.capacity)
            families["errors"].add_metric([endpoint.id], live.error_rate)
            for quantile, value_ms in (("0.5", live.p50_ms), ("0.99", live.p99_ms)):
                if value_ms is not None:
                    families["latency"].add_metric([endpoint.id, quantile], value_ms / 1000)
            state = live.health if live.health in HEALTH_STATES else "unknown"
            for name in HEALTH_STATES:
                families["health"].add_metric([endpoint.id, name], 1 if name == state else 0)
        for endpoint_id, breaker in breaker_states(e.id for e in endpoints).items():
            for name in BREAKER_STATES:
                families["breaker"].add_metric([endpoint_id, name], 1 if name == breaker else 0)

    def _depths(self, depth: GaugeMetricFamily, up: GaugeMetricFamily,
                endpoints: list[Any]) -> None:
        queues = [keys.ROUTE_QUEUE, *(keys.endpoint_queue(e.id) for e in endpoints)]
        try:
            depths = queue_depths(self.broker, queues)
        except redis.RedisError:
            logger.exception("exporter.broker_failed")
            up.add_metric(["broker"], 0)
            return
        up.add_metric(["broker"], 1)
        for queue, count in depths.items():
            depth.add_metric([queue], count)


def cluster_registry() -> CollectorRegistry:
    """A registry holding only the cluster collector, for the configured broker."""
    registry = CollectorRegistry()
    registry.register(ClusterCollector(broker_client(get_settings().broker_url)))
    return registry


def serve(port: int, address: str = "127.0.0.1") -> int:
    """Serve the cluster metrics on `address:port` in a daemon thread; the bound port."""
    from prometheus_client import start_http_server

    server, _ = start_http_server(port, addr=address, registry=cluster_registry())
    bound: int = server.server_address[1]
    return bound
