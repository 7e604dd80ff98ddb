"""What the ingress's routes share: queue a message with `submit()`, await its result.

`accept` runs the producer's own entry (`aimesh_tasks.producer.submit`: full validation,
then publish) in a thread, and notes the message in Redis (agent, time) so that it can be
polled by id. A broker that cannot take the message is a 503: a 2xx is never answered for
a message that was not queued. `answer` awaits the result on the event loop
(`aimesh_tasks.results.ResultWaiter`), no thread held per waiting request.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import redis
from starlette.concurrency import run_in_threadpool

from aimesh_tasks import keys
from aimesh_tasks.errors import InvalidMessage, NotFound, ServiceUnavailable
from aimesh_tasks.messages import API_KEY_KEY, HEDGE_AFTER_MAX_MS
from aimesh_tasks.redis_client import get_redis
from aimesh_tasks.registry.cache import ENDPOINTS
from aimesh_tasks.registry.endpoints import Endpoint
from aimesh_tasks.registry.live import registry_version
from aimesh_tasks.results import Finished, ResultWaiter
from aimesh_tasks.streams.reader import StreamReader

AUTO = "auto"
RECORD_TTL_S = 86400  # as long as Celery keeps results (celery_config.result_expires)
PRIORITY_HEADER = "x-aimesh-priority"
DEADLINE_HEADER = "x-aimesh-deadline-s"
HEDGE_HEADER = "x-aimesh-hedge"


@dataclass(frozen=True, slots=True)
class Accepted:
    """A queued message: its id, and when the ingress queued it (epoch seconds)."""

    message_id: str
    accepted_at: float


def enabled_endpoints() -> tuple[Endpoint, ...]:
    """The enabled endpoints (the per-process registry copy, reloaded when it changes)."""
    return tuple(e for e in ENDPOINTS.at(registry_version()) if e.enabled)


def routable_names() -> list[str]:
    """What `model` may say: 'auto', every enabled endpoint's model and tag."""
    endpoints = enabled_endpoints()
    names = {e.model for e in endpoints} | {t for e in endpoints for t in e.tags}
    return [AUTO, *sorted(names)]


def model_hint(model: str) -> dict[str, str]:
    """The AiMessage hint for OpenAI's `model`: an endpoint's model name, a tag (as a
    capability), or nothing for 'auto'; NotFound (404) for anything else."""
    if model == AUTO:
        return {}
    endpoints = enabled_endpoints()
    if any(e.model == model for e in endpoints):
        return {"model": model}
    if any(model in e.tags for e in endpoints):
        return {"capability": model}
    raise NotFound(f"model '{model[:128]}' is not served here: give 'auto', an endpoint's "
                   "model or a tag (GET /v1/models lists them)", kind="model", id=model[:128],
                   field="model")


def _int_header(headers: Any, name: str) -> int | None:
    value = headers.get(name)
    if value is None:
        return None
    try:
        return int(value)
    except ValueError:
        raise InvalidMessage(f"{name}: '{value[:32]}' is not an integer", field=name,
                             errors=[]) from None


def header_fields(headers: Any) -> dict[str, Any]:
    """AiMessage fields given as headers: Idempotency-Key, X-Aimesh-Priority (0..9),
    X-Aimesh-Deadline-S (seconds from now), X-Aimesh-Hedge (milliseconds, or 'p95': race
    a call slower than that at the next-ranked endpoint)."""
    fields: dict[str, Any] = {}
    if (key := headers.get("idempotency-key")) is not None:
        fields["idempotency_key"] = key
    if (priority := _int_header(headers, PRIORITY_HEADER)) is not None:
        fields["priority"] = priority
    deadline_s = headers.get(DEADLINE_HEADER)
    if deadline_s is not None:
        try:
            seconds = float(deadline_s)
            if not 0 < seconds < 30 * 86400:
                raise ValueError
        except ValueError:
            raise InvalidMessage(f"{DEADLINE_HEADER}: '{deadline_s[:32]}' is not a number of "
                                 "seconds between 0 and 30 days", field=DEADLINE_HEADER,
                                 errors=[]) from None
        fields["deadline"] = datetime.now(UTC) + timedelta(seconds=seconds)
    if (hedge := headers.get(HEDGE_HEADER)) is not None:
        fields["hedge"] = _hedge(hedge.strip())
    return fields


def _hedge(value: str) -> dict[str, Any]:
    if value == "p95":
        return {"after": "p95"}
    if value.isdigit() and int(value) <= HEDGE_AFTER_MAX_MS:
        return {"after_ms": int(value)}
    raise InvalidMessage(f"{HEDGE_HEADER}: '{value[:32]}' is neither 'p95' nor milliseconds "
                         f"from 0 to {HEDGE_AFTER_MAX_MS}", field=HEDGE_HEADER, errors=[])


def stamped_metadata(metadata: dict[str, Any] | None, api_key: str | None
                     ) -> dict[str, Any]:
    """The message's metadata naming the verified key it came with, so that the key's
    rate limits apply: whatever the client put under 'aimesh.api_key' is replaced (or
    dropped, for a caller without an API key, such as a JWT)."""
    kept = {k: v for k, v in (metadata or {}).items() if k != API_KEY_KEY}
    if api_key is not None:
        kept[API_KEY_KEY] = api_key
    return kept


def _accept_sync(data: dict[str, Any]) -> Accepted:
    from aimesh_tasks.producer import submit

    try:
        pending = submit(data)
    except ServiceUnavailable as exc:  # a 503; the broker's address is not the client's
        raise ServiceUnavailable("the broker cannot take the message now; nothing was "
                                 "queued, try again", service="broker",
                                 retry_after_s=1) from exc
    accepted = Accepted(message_id=str(pending.id), accepted_at=time.time())
    try:
        pipe = get_redis().pipeline(transaction=False)
        record = keys.ingress_message(accepted.message_id)
        pipe.hset(record, mapping={"agent_id": data["agent_id"],
                                   "accepted_at": f"{accepted.accepted_at:.3f}"})
        pipe.expire(record, RECORD_TTL_S)
        pipe.execute()
    except redis.RedisError:
        pass  # the message is queued; only polling it by id is lost
    return accepted


class Ingress:
    """The ingress's shared state: the result waiter and the stream reader of this
    process (None without Redis: streams are then cut from the final text)."""

    def __init__(self, waiter: ResultWaiter, streams: StreamReader | None = None) -> None:
        self.waiter = waiter
        self.streams = streams

    async def accept(self, agent_id: str, fields: dict[str, Any],
                     message_id: str | None = None, *, api_key: str | None = None
                     ) -> Accepted:
        """Validate and queue a message of `agent_id` sent with the verified `api_key`
        (its prefix; None: no API key) (InvalidMessage, ServiceUnavailable)."""
        data = {**fields, "agent_id": agent_id, "id": message_id or uuid.uuid4().hex,
                "metadata": stamped_metadata(fields.get("metadata"), api_key)}
        return await run_in_threadpool(_accept_sync, data)

    async def wait(self, message_id: str, timeout_s: float) -> Finished | None:
        """The message's final state, or None if it is not finished after `timeout_s`."""
        return await self.waiter.wait(message_id, timeout_s)


def owner_of(message_id: str) -> str | None:
    """The agent of a message this ingress accepted (None: unknown or expired)."""
    value = get_redis().hget(keys.ingress_message(message_id), "agent_id")
    return str(value) if value is not None else None
