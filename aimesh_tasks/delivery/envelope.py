"""What a kombu virtual-transport envelope must be before the consumer may touch it (pure).

Kombu's Redis transport stores each message as a JSON envelope: `body` (the encoded task
message), `content-type`, `headers` and `properties` (`delivery_tag`, `body_encoding`,
`delivery_info` with `exchange` and `routing_key`). The consumer's main loop decodes and
indexes it with no error handling, so anything else on a queue list stops the worker; these
checks say why a popped item is not an envelope instead.
"""

from __future__ import annotations

import json
from typing import Any

INVALID_JSON = "invalid_json"
NOT_AN_ENVELOPE = "not_an_envelope"


class BadEnvelope(Exception):
    """The bytes on a queue are not a message envelope; `reason` is one of the constants."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(reason, detail)
        self.reason = reason
        self.detail = detail


def decode_envelope(raw: bytes | str) -> Any:
    """The JSON value of a popped queue item, or BadEnvelope(invalid_json)."""
    try:
        text = raw.decode("utf-8") if isinstance(raw, bytes) else raw
        return json.loads(text)
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError
        raise BadEnvelope(INVALID_JSON, f"{type(exc).__name__}: {exc}"[:300]) from exc


def _problem(payload: Any) -> str | None:
    if not isinstance(payload, dict):
        return f"the envelope is a JSON {type(payload).__name__}, not an object"
    properties = payload.get("properties")
    if not isinstance(properties, dict):
        return "'properties' must be an object"
    if not isinstance(properties.get("delivery_tag"), str | int):
        return "'properties.delivery_tag' must be a string or an integer"
    info = properties.get("delivery_info")
    if not isinstance(info, dict) or not all(
            isinstance(info.get(k), str) for k in ("exchange", "routing_key")):
        return "'properties.delivery_info' must hold 'exchange' and 'routing_key' strings"
    for field, kinds in (("headers", (dict, type(None))), ("body", (str, type(None))),
                         ("content-type", (str, type(None)))):
        if not isinstance(payload.get(field), kinds):
            return f"'{field}' has the wrong type ({type(payload.get(field)).__name__})"
    return None


def check_envelope(payload: Any) -> None:
    """Raise BadEnvelope(not_an_envelope) naming the first field the consumer would trip on."""
    problem = _problem(payload)
    if problem is not None:
        raise BadEnvelope(NOT_AN_ENVELOPE, problem)
