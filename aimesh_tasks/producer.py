"""The producer API: validate a message and queue it for routing."""

from __future__ import annotations

from typing import Any

import kombu.exceptions
import redis
from amqp.exceptions import PreconditionFailed  # type: ignore[import-untyped]
from celery.result import AsyncResult
from kombu.utils.url import maybe_sanitize_url

from aimesh_tasks.embedded import ensure_embedded_worker
from aimesh_tasks.errors import ServiceUnavailable
from aimesh_tasks.keys import ROUTE_QUEUE
from aimesh_tasks.messages import AiMessage
from aimesh_tasks.rabbit.preflight import refused as queue_refused
from aimesh_tasks.settings import get_settings
from aimesh_tasks.tasks.route import route_message, validate_or_audit

# What a publish raises when the broker is away or refuses the message (full, read-only),
# past kombu's publish retries.
BROKER_REFUSED = (kombu.exceptions.OperationalError, redis.ConnectionError, OSError)


def submit(message: AiMessage | dict[str, Any] | None = None, /, **fields: Any) -> AsyncResult:
    """Queue one message; its AsyncResult (id = message id) resolves to the AiResult dict.

    Give an AiMessage, a dict, or the fields as keywords:
    `submit(agent_id="research-bot", prompt="...", max_tokens=200)`.
    Raises InvalidMessage, naming the field, before anything is queued; and
    ServiceUnavailable (service="broker") when the broker cannot take the message:
    nothing was queued or recorded, the same message can be submitted again.
    """
    given = message if message is not None else fields
    # Validated once, here (an AiMessage as it would travel: its deadline against the clock
    # now); the routing task's apply_async takes the validated message as it is.
    parsed = validate_or_audit(given.to_json_dict() if isinstance(given, AiMessage) else given)
    ensure_embedded_worker()
    try:
        return route_message.apply_async((parsed,))
    except BROKER_REFUSED as exc:
        raise broker_refused(exc, parsed.id) from exc
    except PreconditionFailed as exc:  # RabbitMQ: the queue exists with other arguments
        raise queue_refused(ROUTE_QUEUE, exc) from None


def broker_refused(exc: BaseException, message_id: str) -> ServiceUnavailable:
    """The error a producer gets for a publish the broker did not take: the broker (its
    URL without the password), why (the library's own words, or the error's type when it
    gives none), and that nothing was queued."""
    reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    broker = maybe_sanitize_url(get_settings().broker_url)
    return ServiceUnavailable(
        f"the broker at {broker} did not take message {message_id} ({reason}); nothing "
        "was queued, submit it again once the broker is back", service="broker",
        message_id=message_id, reason=reason, retry_after_s=1)
