"""A RabbitMQ message as bytes the dead-letter store keeps, and back onto a queue.

The store keeps what sat on a queue. On Redis that is kombu's JSON envelope; an AMQP
message has no such form, so one is made in the same shape (body in base64, content
type and encoding, headers, properties): `aimesh dead show` reads both alike, and
`aimesh dead requeue` publishes it again. Headers RabbitMQ wrote while dead-lettering
(x-death, x-first-death-*, x-delivery-count, ...) are left out: a requeued copy starts
with a clean delivery count.
"""

from __future__ import annotations

import base64
import json
from typing import Any

_PROPERTIES = ("correlation_id", "reply_to", "priority", "delivery_mode", "expiration")


def envelope_of(message: Any, queue: str) -> bytes:
    """The JSON envelope of a kombu AMQP `message` that was on `queue`."""
    body = message.body if isinstance(message.body, bytes) else str(message.body).encode()
    headers = {k: v for k, v in (message.headers or {}).items() if not k.startswith("x-")}
    props = message.properties or {}
    properties = {k: props[k] for k in _PROPERTIES if props.get(k) is not None}
    properties.update(body_encoding="base64",
                      delivery_info={"exchange": "", "routing_key": queue})
    return json.dumps({"body": base64.b64encode(body).decode(),
                       "content-type": message.content_type,
                       "content-encoding": message.content_encoding,
                       "headers": headers, "properties": properties},
                      default=str).encode()


def publish_envelope(broker_url: str, queue: str, raw: bytes) -> None:
    """Publish a stored envelope to `queue` (through the default exchange), confirmed."""
    from kombu.connection import Connection

    envelope = json.loads(raw)
    props = envelope.get("properties", {})
    confirmed = {"confirm_publish": True}
    with Connection(broker_url, transport_options=confirmed) as connection:  # type: ignore[no-untyped-call]
        connection.Producer().publish(
            base64.b64decode(envelope["body"]), exchange="", routing_key=queue,
            content_type=envelope.get("content-type"),
            content_encoding=envelope.get("content-encoding"),
            headers=envelope.get("headers") or {}, retry=True,
            **{k: props[k] for k in ("correlation_id", "reply_to", "priority",
                                     "delivery_mode") if props.get(k) is not None})
