"""The producer API: validate a message and queue it for routing."""

from __future__ import annotations

from typing import Any

from celery.result import AsyncResult

from aimesh_tasks.embedded import ensure_embedded_worker
from aimesh_tasks.messages import AiMessage
from aimesh_tasks.tasks.route import route_message, validate_or_audit


def submit(message: AiMessage | dict[str, Any] | None = None, /, **fields: Any) -> AsyncResult:
    """Queue one message; its AsyncResult (id = message id) resolves to the AiResult dict.

    Give an AiMessage, a dict, or the fields as keywords:
    `submit(agent_id="research-bot", prompt="...", max_tokens=200)`.
    Raises InvalidMessage, naming the field, before anything is queued.
    """
    parsed = validate_or_audit(message if message is not None else fields)
    ensure_embedded_worker()
    return route_message.apply_async((parsed.to_json_dict(),))
