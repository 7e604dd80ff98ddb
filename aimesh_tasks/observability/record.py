"""Receivers that turn message-path events into metric samples (see events.py).

Each receiver is a few label look-ups and increments; none raises into the pipeline
(the event dispatcher logs a receiver's exception and carries on). The metrics module is
imported on first use, not here: prometheus-client fixes its multiprocess mode when it is
imported, which must come after the worker has set PROMETHEUS_MULTIPROC_DIR.
"""

from __future__ import annotations

from typing import Any

from aimesh_tasks import events
from aimesh_tasks.errors import AimeshError
from aimesh_tasks.messages import AiMessage, AiResult, Attempt
from aimesh_tasks.providers.base import Completion
from aimesh_tasks.registry.endpoints import Endpoint
from aimesh_tasks.routing.selection import RoutingDecision
from aimesh_tasks.settings import get_settings

NANO = 1_000_000_000
NO_ENDPOINT_LABEL = "none"


def call_outcome(attempt: Attempt) -> str:
    """A bounded label for how a call went: ok, http_4xx, http_429, http_5xx, ..."""
    if attempt.ok:
        return "ok"
    status = (attempt.error or {}).get("status")
    if status is None:
        return "transport_error"
    if status == 200:
        return "bad_response"
    if status == 429:
        return "http_429"
    return "http_5xx" if int(status) >= 500 else "http_4xx"


def _agent(agent_id: str) -> str | None:
    cap = get_settings().metrics_agent_labels
    if cap <= 0:
        return None
    from aimesh_tasks.observability.metrics import AGENT_LABELS

    return AGENT_LABELS.label(agent_id, cap)


def _count_outcome(message: AiMessage, outcome: str, endpoint_id: str) -> None:
    from aimesh_tasks.observability import metrics

    metrics.MESSAGES.labels(outcome, endpoint_id).inc()
    agent = _agent(message.agent_id)
    if agent is not None:
        metrics.AGENT_MESSAGES.labels(agent, outcome).inc()


def on_routed(message: AiMessage, decision: RoutingDecision, **_: Any) -> None:
    """Count the routing decision under the endpoint chosen first."""
    from aimesh_tasks.observability import metrics

    metrics.MESSAGES_ROUTED.labels(decision.winner.id).inc()


def on_routing_failed(message: AiMessage, error: AimeshError, **_: Any) -> None:
    """Count a message no endpoint could take."""
    from aimesh_tasks.observability.metrics import NO_ENDPOINT

    _count_outcome(message, "unroutable", NO_ENDPOINT)


def on_call_finished(message: AiMessage, endpoint: Endpoint, attempt: Attempt,
                     completion: Completion | None, cost_nusd: int, **_: Any) -> None:
    """Count the call, its latency, and (when answered) its tokens and cost."""
    from aimesh_tasks.observability import metrics

    outcome = call_outcome(attempt)
    metrics.PROVIDER_CALLS.labels(endpoint.id, outcome).inc()
    metrics.PROVIDER_LATENCY.labels(endpoint.id, outcome).observe(attempt.latency_ms / 1000)
    if completion is None:
        return
    metrics.TOKENS.labels(endpoint.id, "input").inc(completion.input_tokens)
    metrics.TOKENS.labels(endpoint.id, "output").inc(completion.output_tokens)
    metrics.COST.labels(endpoint.id).inc(cost_nusd / NANO)
    agent = _agent(message.agent_id)
    if agent is not None:
        metrics.AGENT_TOKENS.labels(agent, "input").inc(completion.input_tokens)
        metrics.AGENT_TOKENS.labels(agent, "output").inc(completion.output_tokens)
        metrics.AGENT_COST.labels(agent).inc(cost_nusd / NANO)


def on_completed(message: AiMessage, result: AiResult, **_: Any) -> None:
    """Count the completion and observe its queue wait and end-to-end latency."""
    from aimesh_tasks.observability import metrics

    _count_outcome(message, "completed", result.endpoint_id)
    metrics.QUEUE_WAIT.labels(result.endpoint_id).observe(max(result.queue_wait_ms, 0) / 1000)
    end_to_end_s = (result.finished_at - result.submitted_at).total_seconds()
    metrics.END_TO_END.labels(result.endpoint_id).observe(max(end_to_end_s, 0.0))


def on_failed(message: AiMessage, error: AimeshError, **_: Any) -> None:
    """Count a message that failed for good."""
    from aimesh_tasks.observability.metrics import NO_ENDPOINT

    _count_outcome(message, "failed", str(error.fields.get("endpoint_id") or NO_ENDPOINT))


def on_deduplicated(message: AiMessage, outcome: str, result: dict[str, Any] | None = None,
                    **_: Any) -> None:
    """Count the dedup decision; a cache hit is also a finished message ('cached')."""
    from aimesh_tasks.observability import metrics

    metrics.CACHE_LOOKUPS.labels(outcome).inc()
    if outcome == "hit" and result is not None:
        _count_outcome(message, "cached", str(result.get("endpoint_id", NO_ENDPOINT_LABEL)))


def on_budget_settled(agent_id: str, tokens_left: int | None, nusd_left: int | None,
                      **_: Any) -> None:
    """Set the agent's budget-left gauges (only when agent labels are configured)."""
    from aimesh_tasks.observability import metrics

    agent = _agent(agent_id)
    if agent is None:
        return
    if tokens_left is not None:
        metrics.AGENT_BUDGET_TOKENS_LEFT.labels(agent).set(tokens_left)
    if nusd_left is not None:
        metrics.AGENT_BUDGET_USD_LEFT.labels(agent).set(nusd_left / NANO)


def on_hedge_decided(endpoint_id: str, outcome: str, **_: Any) -> None:
    """Count a hedge fired, or not fired and why."""
    from aimesh_tasks.observability import metrics

    metrics.HEDGES.labels(endpoint_id, outcome).inc()


def connect() -> None:
    """Connect the metric receivers (idempotent: Celery signals dedupe by receiver)."""
    events.message_routed.connect(on_routed, weak=False)
    events.routing_failed.connect(on_routing_failed, weak=False)
    events.call_finished.connect(on_call_finished, weak=False)
    events.message_completed.connect(on_completed, weak=False)
    events.message_failed.connect(on_failed, weak=False)
    events.message_deduplicated.connect(on_deduplicated, weak=False)
    events.budget_settled.connect(on_budget_settled, weak=False)
    events.hedge_decided.connect(on_hedge_decided, weak=False)
