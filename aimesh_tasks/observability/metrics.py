"""Every Prometheus metric a worker exports, defined once.

Why prometheus-client multiprocess mode, not one exporter per worker node: the events
that feed these metrics fire inside prefork pool children, each with its own memory; an
exporter in the parent would see none of their counts, and one HTTP port per child cannot
be scraped reliably (children are replaced by max-tasks-per-child and crashes). In
multiprocess mode every process writes its samples to mmap files in
PROMETHEUS_MULTIPROC_DIR and the worker node's main process sums them on each scrape
(`aimesh_tasks.observability.worker`), so one port per node gives correct totals for the
prefork, threads and gevent pools alike. The directory is per worker node and wiped when
the node starts. No live gauge is defined here, so dead children need no bookkeeping:
figures that belong to the whole cluster (queue depths, calls in flight, live latency)
come from Redis through the cluster exporter (`aimesh_tasks.observability.exporter`).

| metric                                   | type      | labels                |
|------------------------------------------|-----------|-----------------------|
| aimesh_messages_routed_total             | counter   | endpoint              |
| aimesh_messages_total                    | counter   | outcome, endpoint     |
| aimesh_provider_calls_total              | counter   | endpoint, outcome     |
| aimesh_provider_latency_seconds          | histogram | endpoint, outcome     |
| aimesh_queue_wait_seconds                | histogram | endpoint              |
| aimesh_end_to_end_latency_seconds        | histogram | endpoint              |
| aimesh_tokens_total                      | counter   | endpoint, direction   |
| aimesh_cost_usd_total                    | counter   | endpoint              |
| aimesh_agent_messages_total              | counter   | agent, outcome        |
| aimesh_agent_tokens_total                | counter   | agent, direction      |
| aimesh_agent_cost_usd_total              | counter   | agent                 |
| aimesh_dead_letters_total                | counter   | queue, reason         |

Labels are bounded: `endpoint` is a registry id (admin-created) or 'none'; `outcome`,
`direction` are fixed sets; `agent` exists only on the aimesh_agent_* metrics, which are
updated only when AIMESH_METRICS_AGENT_LABELS > 0, and then only that many distinct agent
ids per process get their own value (later ones count under '_other').
Not defined yet, because nothing measures them today: cache hits/misses/single-flight
joins and budget remaining (they come with those features). Circuit-breaker state is
cluster-wide, read from Redis by the cluster exporter (aimesh_breaker_state).
"""

from __future__ import annotations

import threading

from prometheus_client import Counter, Gauge, Histogram

NO_ENDPOINT = "none"
OTHER_AGENTS = "_other"

# 1.25x steps from 1 ms to ~110 s: histogram_quantile() interpolates inside one bucket, so
# a p50, p99 or p99.9 read from it is off by less than 25 %, from a few ms to minutes.
LATENCY_BUCKETS_S: tuple[float, ...] = tuple(
    round(0.001 * 1.25**n, 6) for n in range(53)
) + (float("inf"),)

MESSAGES_ROUTED = Counter(
    "aimesh_messages_routed", "Messages routed, by the endpoint chosen first.", ["endpoint"]
)
MESSAGES = Counter(
    "aimesh_messages",
    "Messages finished, by outcome (completed, failed, unroutable) and endpoint.",
    ["outcome", "endpoint"],
)
PROVIDER_CALLS = Counter(
    "aimesh_provider_calls",
    "Upstream calls, by outcome (ok, http_4xx, http_429, http_5xx, transport_error, "
    "bad_response).",
    ["endpoint", "outcome"],
)
PROVIDER_LATENCY = Histogram(
    "aimesh_provider_latency_seconds",
    "Duration of one upstream call (ok or error).",
    ["endpoint", "outcome"],
    buckets=LATENCY_BUCKETS_S,
)
QUEUE_WAIT = Histogram(
    "aimesh_queue_wait_seconds",
    "Submission to the start of the first call, for completed messages (includes routing).",
    ["endpoint"],
    buckets=LATENCY_BUCKETS_S,
)
END_TO_END = Histogram(
    "aimesh_end_to_end_latency_seconds",
    "Submission to result, for completed messages.",
    ["endpoint"],
    buckets=LATENCY_BUCKETS_S,
)
TOKENS = Counter(
    "aimesh_tokens", "Tokens of every answered call, from provider usage.",
    ["endpoint", "direction"],
)
COST = Counter("aimesh_cost_usd", "Cost of every answered call, in USD.", ["endpoint"])
AGENT_MESSAGES = Counter(
    "aimesh_agent_messages", "Messages finished per agent, by outcome.", ["agent", "outcome"]
)
AGENT_TOKENS = Counter(
    "aimesh_agent_tokens", "Tokens of answered calls per agent.", ["agent", "direction"]
)
AGENT_COST = Counter("aimesh_agent_cost_usd", "Cost of answered calls per agent, in USD.",
                     ["agent"])

CACHE_LOOKUPS = Counter(
    "aimesh_cache_lookups",
    "Dedup decisions: hit (answered from cache), join (single-flight follower), miss (led a "
    "call), bypass (no_cache).",
    ["outcome"],
)
HEDGES = Counter(
    "aimesh_hedges",
    "Hedges as their task decided at their endpoint: fired, or not (race_won, race_closed, "
    "deadline, hedge_budget, budget).",
    ["endpoint", "outcome"],
)
DEAD_LETTERS = Counter(
    "aimesh_dead_letters",
    "Messages moved to the dead-letter store, by queue and reason (aimesh_tasks.delivery).",
    ["queue", "reason"],
)
# Gauges from many processes: the value most recently written by any of them.
AGENT_BUDGET_TOKENS_LEFT = Gauge(
    "aimesh_agent_budget_tokens_left", "Tokens left in the agent's budget period.", ["agent"],
    multiprocess_mode="mostrecent",
)
AGENT_BUDGET_USD_LEFT = Gauge(
    "aimesh_agent_budget_usd_left", "USD left in the agent's budget period.", ["agent"],
    multiprocess_mode="mostrecent",
)

ALL_METRICS = (MESSAGES_ROUTED, MESSAGES, PROVIDER_CALLS, PROVIDER_LATENCY, QUEUE_WAIT,
               END_TO_END, TOKENS, COST, AGENT_MESSAGES, AGENT_TOKENS, AGENT_COST,
               CACHE_LOOKUPS, AGENT_BUDGET_TOKENS_LEFT, AGENT_BUDGET_USD_LEFT, DEAD_LETTERS)


class AgentLabels:
    """Hands out at most `cap` distinct agent label values; later agents share '_other'."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._seen: set[str] = set()

    def label(self, agent_id: str, cap: int) -> str:
        """The label value for `agent_id` under a cap of `cap` distinct agents."""
        with self._lock:
            if agent_id in self._seen:
                return agent_id
            if len(self._seen) < cap:
                self._seen.add(agent_id)
                return agent_id
        return OTHER_AGENTS


AGENT_LABELS = AgentLabels()
