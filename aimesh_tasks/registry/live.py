"""Live figures per endpoint in Redis, shared by every worker.

Per endpoint: a sorted set of calls in flight (scored by start time, so a call whose
worker died ages out after the hard time limit instead of leaking), a window of the
last AIMESH_LIVE_WINDOW calls, and a hash of figures derived from it on every call
(latency p50/p95/p99 of successful calls, error rate, health). The router reads all
endpoints' figures in one pipelined round trip.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from aimesh_tasks import keys
from aimesh_tasks.redis_batch import Batch, Reader, run, send
from aimesh_tasks.redis_client import get_redis
from aimesh_tasks.settings import get_settings

# KEYS: inflight, window, stats. ARGV: call_key, latency_ms, ok(1/0), window, fail_limit, now
_RECORD_END = """
redis.call('ZREM', KEYS[1], ARGV[1])
redis.call('LPUSH', KEYS[2], ARGV[2] .. ':' .. ARGV[3])
redis.call('LTRIM', KEYS[2], 0, tonumber(ARGV[4]) - 1)
local items = redis.call('LRANGE', KEYS[2], 0, -1)
local lat = {}
local errors = 0
for _, item in ipairs(items) do
  local sep = string.find(item, ':', 1, true)
  if string.sub(item, sep + 1) == '1' then
    lat[#lat + 1] = tonumber(string.sub(item, 1, sep - 1))
  else
    errors = errors + 1
  end
end
table.sort(lat)
local n = #lat
local fields = {'calls', #items, 'error_rate', tostring(errors / #items), 'seen_at', ARGV[6]}
if n > 0 then
  fields[#fields + 1] = 'p50_ms'
  fields[#fields + 1] = tostring(lat[math.max(1, math.ceil(n * 0.5))])
  fields[#fields + 1] = 'p95_ms'
  fields[#fields + 1] = tostring(lat[math.max(1, math.ceil(n * 0.95))])
  fields[#fields + 1] = 'p99_ms'
  fields[#fields + 1] = tostring(lat[math.max(1, math.ceil(n * 0.99))])
end
if ARGV[3] == '1' then
  redis.call('HSET', KEYS[3], 'failures', 0, 'health', 'up', 'health_at', ARGV[6])
else
  local failures = redis.call('HINCRBY', KEYS[3], 'failures', 1)
  if failures >= tonumber(ARGV[5]) then
    redis.call('HSET', KEYS[3], 'health', 'down', 'health_at', ARGV[6])
  end
end
redis.call('HSET', KEYS[3], unpack(fields))
return 1
"""


@dataclass(frozen=True, slots=True)
class LiveFigures:
    """What the router knows of an endpoint right now."""

    in_flight: int = 0
    p50_ms: float | None = None
    p95_ms: float | None = None  # the delay of a hedge 'after': 'p95' (resilience/hedging)
    p99_ms: float | None = None
    error_rate: float = 0.0
    calls: int = 0
    health: str = "unknown"
    health_at: float = 0.0

    def is_down(self, now: float, retry_after_s: float) -> bool:
        """Down, and not yet due for another try."""
        return self.health == "down" and now - self.health_at < retry_after_s

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe dict."""
        return {
            "in_flight": self.in_flight,
            "p50_ms": self.p50_ms,
            "p95_ms": self.p95_ms,
            "p99_ms": self.p99_ms,
            "error_rate": self.error_rate,
            "calls": self.calls,
            "health": self.health,
        }


def _optional_float(value: str | None) -> float | None:
    return float(value) if value is not None else None


def _figures(stats: dict[str, str], in_flight: int) -> LiveFigures:
    return LiveFigures(
        in_flight=in_flight,
        p50_ms=_optional_float(stats.get("p50_ms")),
        p95_ms=_optional_float(stats.get("p95_ms")),
        p99_ms=_optional_float(stats.get("p99_ms")),
        error_rate=float(stats.get("error_rate", 0.0)),
        calls=int(stats.get("calls", 0)),
        health=stats.get("health", "unknown"),
        health_at=float(stats.get("health_at", 0.0)),
    )


def queue_call_started(batch: Batch, endpoint_id: str, call_key: str) -> None:
    """Queue counting a call in flight at the endpoint."""
    batch.call("ZADD", keys.live_inflight(endpoint_id), time.time(), call_key)


def call_started(endpoint_id: str, call_key: str) -> None:
    """Count a call in flight at the endpoint."""
    send(lambda batch: queue_call_started(batch, endpoint_id, call_key))


def queue_call_finished(batch: Batch, endpoint_id: str, call_key: str, latency_ms: float,
                        ok: bool) -> None:
    """Queue taking the call out of flight and folding its latency and outcome into the
    endpoint's figures."""
    settings = get_settings()
    batch.script(
        _RECORD_END,
        keys=[keys.live_inflight(endpoint_id), keys.live_window(endpoint_id),
              keys.live_stats(endpoint_id)],
        args=[call_key, f"{latency_ms:.3f}", 1 if ok else 0, settings.live_window,
              settings.unhealthy_after_failures, f"{time.time():.3f}"],
    )


def call_finished(endpoint_id: str, call_key: str, latency_ms: float, ok: bool) -> None:
    """Take the call out of flight and fold its latency and outcome into the figures."""
    send(lambda batch: queue_call_finished(batch, endpoint_id, call_key, latency_ms, ok))


def queue_call_abandoned(batch: Batch, endpoint_id: str, call_key: str) -> None:
    """Queue taking a call out of flight that was never made (its answer was found
    journalled)."""
    batch.call("ZREM", keys.live_inflight(endpoint_id), call_key)


def call_abandoned(endpoint_id: str, call_key: str) -> None:
    """Take a call out of flight that was never made (its answer was found journalled)."""
    send(lambda batch: queue_call_abandoned(batch, endpoint_id, call_key))


Figures = tuple[dict[str, LiveFigures], str]


def queue_figures(batch: Batch, endpoint_ids: Iterable[str]) -> Reader[Figures]:
    """Queue reading every endpoint's figures plus the registry version."""
    ids = list(endpoint_ids)
    oldest_live_start = time.time() - get_settings().task_time_limit_s
    first = batch.call("GET", keys.registry_version())
    for endpoint_id in ids:
        batch.call("HGETALL", keys.live_stats(endpoint_id))
        batch.call("ZCOUNT", keys.live_inflight(endpoint_id), oldest_live_start, "+inf")

    def read() -> Figures:
        figures = {
            endpoint_id: _figures(batch[first + 1 + 2 * i], int(batch[first + 2 + 2 * i]))
            for i, endpoint_id in enumerate(ids)
        }
        return figures, str(batch[first] or "")

    return read


def read_figures(endpoint_ids: Iterable[str]) -> Figures:
    """Every endpoint's figures plus the registry version, in one pipelined round trip."""
    return run(lambda batch: queue_figures(batch, endpoint_ids))


def registry_version() -> str:
    """The current registry version token ('' before the first change)."""
    return str(get_redis().get(keys.registry_version()) or "")


def reset_figures(endpoint_id: str) -> None:
    """Forget an endpoint's live figures (tests; a re-created endpoint)."""
    get_redis().delete(
        keys.live_inflight(endpoint_id), keys.live_window(endpoint_id), keys.live_stats(endpoint_id)
    )
