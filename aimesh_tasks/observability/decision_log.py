"""One structured log event per decision on the message path (see events.py).

| event                  | level   | fields                                                   |
|------------------------|---------|----------------------------------------------------------|
| message.routed         | info    | message_id, agent_id, endpoint_id, fallbacks, score      |
| message.routing_failed | warning | message_id, agent_id, error_code, error                  |
| call.finished          | info    | message_id, agent_id, endpoint_id, ok, status,           |
|                        |         | latency_ms, input_tokens, output_tokens, cost_usd        |
| message.completed      | info    | message_id, agent_id, endpoint_id, tokens, cost_usd,     |
|                        |         | queue_wait_ms, processing_ms, attempts                   |
| message.failed         | warning | message_id, agent_id, endpoint_id, error_code, error     |

`message.routed` carries `prompt` (first 2,000 characters) only when AIMESH_LOG_PROMPTS
is true. Error texts are our own error messages (ids, statuses), never request bodies.
"""

from __future__ import annotations

import logging
from typing import Any

from aimesh_tasks import events
from aimesh_tasks.errors import AimeshError
from aimesh_tasks.messages import AiMessage, AiResult, Attempt
from aimesh_tasks.money import nusd_to_usd
from aimesh_tasks.observability.logging import REDACTOR
from aimesh_tasks.providers.base import Completion
from aimesh_tasks.registry.endpoints import Endpoint
from aimesh_tasks.routing.selection import RoutingDecision
from aimesh_tasks.settings import get_settings

logger = logging.getLogger("aimesh_tasks.decisions")
PROMPT_LOG_CHARS = 2000


def _ids(message: AiMessage) -> dict[str, Any]:
    return {"message_id": message.id, "agent_id": message.agent_id}


def on_routed(message: AiMessage, decision: RoutingDecision, **_: Any) -> None:
    """Log the endpoint chosen and the fallbacks."""
    for endpoint in decision.route:
        REDACTOR.add_env(endpoint.api_key_env)
    fields = {**_ids(message), "endpoint_id": decision.winner.id,
              "fallbacks": [e.id for e in decision.route[1:]],
              "score": decision.ranked[0].score if decision.ranked else None}
    if get_settings().log_prompts:
        fields["prompt"] = "\n".join(m.text() for m in message.messages)[:PROMPT_LOG_CHARS]
    logger.info("message.routed", extra=fields)


def on_routing_failed(message: AiMessage, error: AimeshError, **_: Any) -> None:
    """Log why no endpoint could take the message."""
    logger.warning("message.routing_failed",
                   extra={**_ids(message), "error_code": error.code, "error": error.message})


def on_call_finished(message: AiMessage, endpoint: Endpoint, attempt: Attempt,
                     completion: Completion | None, cost_nusd: int, **_: Any) -> None:
    """Log one upstream call and what it cost."""
    REDACTOR.add_env(endpoint.api_key_env)
    logger.info("call.finished", extra={
        **_ids(message), "endpoint_id": endpoint.id, "ok": attempt.ok,
        "status": (attempt.error or {}).get("status"), "latency_ms": attempt.latency_ms,
        "input_tokens": completion.input_tokens if completion else 0,
        "output_tokens": completion.output_tokens if completion else 0,
        "cost_usd": str(nusd_to_usd(cost_nusd)),
    })


def on_completed(message: AiMessage, result: AiResult, **_: Any) -> None:
    """Log the result's figures (never its text)."""
    logger.info("message.completed", extra={
        **_ids(message), "endpoint_id": result.endpoint_id,
        "input_tokens": result.input_tokens, "output_tokens": result.output_tokens,
        "cost_usd": format(result.cost_usd, "f"), "queue_wait_ms": result.queue_wait_ms,
        "processing_ms": result.processing_ms, "attempts": len(result.attempts),
    })


def on_failed(message: AiMessage, error: AimeshError, **_: Any) -> None:
    """Log a message that failed for good."""
    logger.warning("message.failed", extra={
        **_ids(message), "endpoint_id": error.fields.get("endpoint_id"),
        "error_code": error.code, "error": error.message,
    })


def connect() -> None:
    """Connect the decision-log receivers (idempotent)."""
    events.message_routed.connect(on_routed, weak=False)
    events.routing_failed.connect(on_routing_failed, weak=False)
    events.call_finished.connect(on_call_finished, weak=False)
    events.message_completed.connect(on_completed, weak=False)
    events.message_failed.connect(on_failed, weak=False)
