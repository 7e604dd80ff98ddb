"""The dead-letter store: messages a worker could not run, one Redis stream per queue.

Each entry keeps the message's raw bytes as they sat on the queue (the first 64 KiB; on
RabbitMQ an envelope of the same shape, rabbit/envelope.py), why it
was set aside, the queue, the time, the task id and name when they could be read, which
worker process set it aside and, for a task that killed its worker, the deliveries that
did. Every entry is counted once in `aimesh_dead_letters_total{queue,reason}` and logged
once (`message.dead_lettered`, without the payload). `aimesh dead` is the shell over this.

| reason           | the message                                                          |
|------------------|----------------------------------------------------------------------|
| invalid_json     | is not JSON at all (or nests too deep to decode)                     |
| not_an_envelope  | is JSON, but not a broker envelope (properties, delivery_info, body) |
| not_a_task       | is an envelope whose headers and body name no Celery task            |
| unknown_task     | names a task no worker registers                                     |
| content_type     | has a content type the workers refuse (pickle, yaml, ...)            |
| undecodable_body | has a body that does not decode (bad JSON, too deep, bad encoding)   |
| invalid_task     | is a task message Celery refuses (bad eta, expires, timelimit; a     |
|                  | body that is not [args, kwargs, embed])                              |
| bad_arguments    | has arguments that do not fit the task's signature                   |
| max_deliveries   | lost its worker on each of AIMESH_MAX_DELIVERIES deliveries (on      |
|                  | RabbitMQ quorum queues the broker counts: rabbit/drain.py)           |
| dead_lettered    | RabbitMQ dead-lettered it for another reason (rejected, expired)     |

Streams are capped at about MAX_ENTRIES_PER_QUEUE entries (the oldest go first), so a flood
of bad messages cannot fill Redis.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import socket
import time
from collections.abc import Iterable, Iterator
from typing import Any, TypedDict

import redis

from aimesh_tasks import keys
from aimesh_tasks.errors import ConfigError, InvalidInput, NotFound
from aimesh_tasks.redis_client import get_redis
from aimesh_tasks.settings import get_settings

RAW_LIMIT_BYTES = 64 * 1024
# Dead letters whose routing key names no queue the worker reads (delivery.request).
OTHER_QUEUE = "_other"
MAX_ENTRIES_PER_QUEUE = 10_000
ENTRY_VERSION = 1
logger = logging.getLogger(__name__)


class DeadLetter(TypedDict):
    """One dead letter; `raw` holds at most RAW_LIMIT_BYTES of the `size` original bytes."""

    v: int
    id: str
    queue: str
    reason: str
    detail: str
    at: float
    task_id: str | None
    task: str | None
    host: str
    pid: int
    size: int
    raw: bytes
    history: list[dict[str, Any]]


def is_truncated(entry: DeadLetter) -> bool:
    """True when only the start of the message was kept."""
    return entry["size"] > len(entry["raw"])


def to_json_dict(entry: DeadLetter, *, with_raw: bool = True) -> dict[str, Any]:
    """The JSON form: the raw bytes as base64 (`raw_b64`) and as UTF-8 text with
    replacement characters (`raw_text`), or neither; `truncated` says if they are whole."""
    shown: dict[str, Any] = {k: v for k, v in entry.items() if k != "raw"}
    shown["truncated"] = is_truncated(entry)
    if with_raw:
        shown["raw_b64"] = base64.b64encode(entry["raw"]).decode()
        shown["raw_text"] = entry["raw"].decode("utf-8", errors="replace")
    return shown


def add(queue: str, raw: bytes, reason: str, detail: str, *, task_id: str | None = None,
        task: str | None = None, history: Iterable[dict[str, Any]] = ()) -> DeadLetter:
    """Store a dead letter of `queue`, count it and log one line; the stored entry."""
    fields = {"v": ENTRY_VERSION, "queue": queue, "reason": reason, "detail": detail[:300],
              "at": time.time(), "task_id": task_id or "", "task": task or "",
              "host": socket.gethostname(), "pid": os.getpid(), "size": len(raw),
              "raw": base64.b64encode(raw[:RAW_LIMIT_BYTES]).decode(),
              "history": json.dumps(list(history))}
    client = get_redis()
    with client.pipeline(transaction=False) as pipe:
        pipe.xadd(keys.dead_letters(queue), fields,  # type: ignore[arg-type]
                  maxlen=MAX_ENTRIES_PER_QUEUE, approximate=True)
        pipe.sadd(keys.dead_letter_queues(), queue)
        entry_id = str(pipe.execute()[0])
    _count_and_log(queue, reason, entry_id, task_id, task, len(raw), detail)
    return _entry(entry_id, {k: str(v) for k, v in fields.items()})


def _count_and_log(queue: str, reason: str, entry_id: str, task_id: str | None,
                   task: str | None, size: int, detail: str) -> None:
    from aimesh_tasks.observability.metrics import DEAD_LETTERS

    DEAD_LETTERS.labels(queue=queue, reason=reason).inc()
    logger.error("message.dead_lettered", extra={
        "queue": queue, "reason": reason, "dead_letter_id": entry_id, "task_id": task_id,
        "task": task, "bytes": size, "detail": detail[:300]})


def _entry(entry_id: str, fields: dict[str, str]) -> DeadLetter:
    return DeadLetter(
        v=int(fields.get("v", ENTRY_VERSION)), id=entry_id, queue=fields["queue"],
        reason=fields["reason"], detail=fields.get("detail", ""), at=float(fields["at"]),
        task_id=fields.get("task_id") or None, task=fields.get("task") or None,
        host=fields.get("host", ""), pid=int(fields.get("pid", 0)),
        size=int(fields.get("size", 0)), raw=base64.b64decode(fields.get("raw", "")),
        history=json.loads(fields.get("history") or "[]"),
    )


def queues() -> list[str]:
    """The queues that have dead letters, sorted."""
    return sorted(str(q) for q in get_redis().smembers(keys.dead_letter_queues()))


def _entries(rows: Any) -> list[DeadLetter]:
    return [_entry(str(i), {str(k): str(v) for k, v in f.items()}) for i, f in rows or []]


def list_entries(queue: str | None = None, limit: int = 100) -> list[DeadLetter]:
    """The newest `limit` dead letters of `queue` (or of every queue), newest first."""
    found: list[DeadLetter] = []
    client = get_redis()
    for name in [queue] if queue else queues():
        found += _entries(client.xrevrange(keys.dead_letters(name), count=limit))
    return sorted(found, key=lambda e: e["at"], reverse=True)[:limit]


def _scan(queue: str | None) -> Iterator[DeadLetter]:
    client = get_redis()
    for name in [queue] if queue else queues():
        yield from _entries(client.xrange(keys.dead_letters(name)))


def show(ref: str, queue: str | None = None) -> DeadLetter:
    """The dead letter whose id, or whose task id, is `ref` (NotFound, or InvalidInput
    when ids of several queues match and `queue` does not say which)."""
    matches = [e for e in _scan(queue) if ref in (e["id"], e["task_id"])]
    if not matches:
        where = f"queue '{queue}'" if queue else "any queue"
        raise NotFound(f"no dead letter with id or task id '{ref}' in {where}; see "
                       "`aimesh dead list`", kind="dead_letter", id=ref)
    if len({e["queue"] for e in matches}) > 1:
        raise InvalidInput(f"dead letter '{ref}' exists on several queues; give --queue",
                           field="queue", errors=[])
    return matches[-1]


def _put_back(queue: str, raw: bytes) -> None:
    """Put a stored message at the tail of `queue` on the configured broker."""
    from aimesh_tasks.rabbit.queues import is_amqp

    url = get_settings().broker_url
    if is_amqp(url):
        from aimesh_tasks.rabbit.envelope import publish_envelope

        publish_envelope(url, queue, raw)
    elif url.startswith(("redis://", "rediss://")):
        # kombu's Redis transport publishes with LPUSH and consumes with BRPOP: the tail.
        redis.Redis.from_url(url).lpush(queue, raw)
    else:
        raise ConfigError(f"requeue needs a Redis or RabbitMQ broker; AIMESH_BROKER_URL is "
                          f"{url.split('://', 1)[0]}://", setting="AIMESH_BROKER_URL")


def requeue(ref: str, queue: str | None = None) -> DeadLetter:
    """Put a dead letter's raw bytes back at the tail of its queue and remove the entry;
    its task's delivery count starts again. A truncated entry cannot be requeued."""
    entry = show(ref, queue)
    if entry["queue"] == OTHER_QUEUE:
        raise InvalidInput(f"dead letter '{entry['id']}' named no queue a worker reads; it "
                           "cannot be requeued", field="queue", errors=[])
    if is_truncated(entry):
        raise InvalidInput(f"dead letter '{entry['id']}' kept only {len(entry['raw'])} of its "
                           f"{entry['size']} bytes; it cannot be requeued", field="id",
                           errors=[])
    _put_back(entry["queue"], entry["raw"])
    client = get_redis()
    client.xdel(keys.dead_letters(entry["queue"]), entry["id"])
    if entry["task_id"]:
        client.delete(keys.deliveries(entry["task_id"]),
                      keys.delivery_history(entry["task_id"]), keys.put_back(entry["task_id"]))
    return entry


def purge(queue: str | None = None, ref: str | None = None) -> int:
    """Delete one dead letter (`ref`), or every dead letter of `queue` (or of all queues);
    the number deleted."""
    client = get_redis()
    if ref is not None:
        entry = show(ref, queue)
        return int(client.xdel(keys.dead_letters(entry["queue"]), entry["id"]))
    names = [queue] if queue else queues()
    removed = sum(int(client.xlen(keys.dead_letters(name))) for name in names)
    if names:
        client.delete(*(keys.dead_letters(name) for name in names))
        client.srem(keys.dead_letter_queues(), *names)
    return removed
