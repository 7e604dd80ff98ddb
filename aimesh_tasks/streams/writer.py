"""Writing a message's stream (worker side): a call's deltas as they arrive, its end.

`Forwarder` is handed each text delta of one streaming call, on the caller's thread, as
the provider sends it (providers/http.py). Each delta is one round trip: XADD of the entry
(with the call's `start` before its first delta) trimmed with MAXLEN ~
AIMESH_STREAM_MAXLEN, EXPIRE of the stream (AIMESH_STREAM_TTL_S), and EXISTS of the
message's gone flag, which the ingress sets when its client leaves. Once the flag is seen
nothing more is forwarded (nobody reads it) and `on_gone` runs: the call task sets the
call's cancel event there when AIMESH_STREAM_ON_DISCONNECT=abort.

Forwarding never fails a call: Redis trouble stops the forwarding (logged once), and the
reader fills the missing text from the message's `end` entry or its result.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import redis

from aimesh_tasks import keys
from aimesh_tasks.redis_batch import Batch
from aimesh_tasks.settings import get_settings
from aimesh_tasks.streams.entries import FIELD, Delta, End, Entry, Failure, Start, encode

logger = logging.getLogger(__name__)


def queue_append(batch: Batch, message_id: str, *entries: Entry) -> None:
    """Queue appending `entries` to the message's stream and renewing its expiry."""
    settings = get_settings()
    stream = keys.message_stream(message_id)
    for entry in entries:
        batch.call("XADD", stream, "MAXLEN", "~", settings.stream_maxlen, "*", FIELD,
                   encode(entry))
    batch.call("EXPIRE", stream, settings.stream_ttl_s)


def queue_end(batch: Batch, message_id: str, result: dict[str, Any]) -> None:
    """Queue the message's `end` entry (its AiResult dict)."""
    queue_append(batch, message_id, End(result))


def queue_failure(batch: Batch, message_id: str, error: dict[str, Any]) -> None:
    """Queue the message's `error` entry (`AimeshError.to_dict()`)."""
    queue_append(batch, message_id, Failure(error))


class Forwarder:
    """Forwards the text of one streaming call to its message's stream (see the module
    docstring). `sent` counts the characters handed over, `gone` says the client left."""

    def __init__(self, message_id: str, call_key: str, endpoint_id: str, model: str,
                 on_gone: Callable[[], None] | None = None) -> None:
        self.message_id = message_id
        self.start = Start(call_key, endpoint_id, model)
        self.sent = 0
        self.gone = False
        self.broken = False
        self._on_gone = on_gone

    @property
    def forwarding(self) -> bool:
        """Deltas still go to the stream (the client is there, Redis answers)."""
        return not (self.gone or self.broken)

    def __call__(self, text: str) -> None:
        """Forward one delta (from `sent` characters on)."""
        if not text:
            return
        at, self.sent = self.sent, self.sent + len(text)
        if not self.forwarding:
            return
        delta = Delta(self.start.call, at, text)
        batch = Batch()
        queue_append(batch, self.message_id, *((self.start, delta) if at == 0 else (delta,)))
        gone = batch.call("EXISTS", keys.stream_gone(self.message_id))
        try:
            batch.send()
        except redis.RedisError as exc:
            self.broken = True
            logger.warning("streams.forward_failed", extra={
                "message_id": self.message_id, "error": type(exc).__name__})
            return
        if batch[gone]:
            self.client_left()

    def client_left(self) -> None:
        """The client went away: stop forwarding; tell the call (once)."""
        if self.gone:
            return
        self.gone = True
        if self._on_gone is not None:
            self._on_gone()


def replay(message_id: str, call_key: str, endpoint_id: str, model: str, text: str) -> None:
    """Write a journalled call's whole text as its stream (a redelivery that does not call
    again); a reader skips what it relayed already, by offset."""
    batch = Batch()
    queue_append(batch, message_id, Start(call_key, endpoint_id, model),
                 *((Delta(call_key, 0, text),) if text else ()))
    batch.send()
