"""The entries of a message's stream, as they travel through Redis (pure: no I/O).

Every entry is one field, `e`, holding versioned JSON `{"v": 1, "kind": ..., ...}`:

| kind  | written by                      | carries                                       |
|-------|---------------------------------|-----------------------------------------------|
| start | the call, with its first delta  | the call key, the endpoint and its model      |
| delta | the call, as text arrives       | the call key, the text, its offset (`at`, in  |
|       |                                 | characters of that call's answer)             |
| end   | the path, once the call settled | the message's AiResult (usage, finish reason) |
| error | the path, when the message fails| the error (`AimeshError.to_dict()`)           |

Offsets make a reader idempotent: a delta it has already relayed (a redelivered call
replaying its journal) is skipped, and a gap (entries trimmed before it read them) is
filled from the text of the `end` entry.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from typing import Any

STREAM_VERSION = 1
FIELD = "e"


@dataclass(frozen=True, slots=True)
class Start:
    """A call began answering: its key, the endpoint and model answering."""

    call: str
    endpoint_id: str
    model: str


@dataclass(frozen=True, slots=True)
class Delta:
    """Text of a call's answer, starting `at` characters into it."""

    call: str
    at: int
    text: str


@dataclass(frozen=True, slots=True)
class End:
    """The message is answered: its AiResult dict (the same the result backend holds)."""

    result: dict[str, Any]


@dataclass(frozen=True, slots=True)
class Failure:
    """The message failed: its error as `AimeshError.to_dict()` gives it."""

    error: dict[str, Any]


Entry = Start | Delta | End | Failure
_KINDS: dict[str, type[Entry]] = {"start": Start, "delta": Delta, "end": End, "error": Failure}
_NAMES = {cls: name for name, cls in _KINDS.items()}


def encode(entry: Entry) -> str:
    """The entry's JSON (the value of its `e` field)."""
    return json.dumps({"v": STREAM_VERSION, "kind": _NAMES[type(entry)], **asdict(entry)},
                      separators=(",", ":"), ensure_ascii=False)


def decode(raw: str | bytes) -> Entry:
    """An entry from its JSON; ValueError naming what is wrong (a newer version, an
    unknown kind, missing fields)."""
    try:
        data = json.loads(raw)
        version, kind = data.pop("v"), data.pop("kind")
    except (ValueError, KeyError, AttributeError, TypeError) as exc:
        raise ValueError(f"not a stream entry: {str(raw)[:80]!r}") from exc
    if version != STREAM_VERSION:
        raise ValueError(f"stream entry version {version!r}: this release reads "
                         f"{STREAM_VERSION}")
    cls = _KINDS.get(kind)
    if cls is None:
        raise ValueError(f"stream entry of unknown kind {kind!r}")
    try:
        return cls(**data)
    except TypeError as exc:
        raise ValueError(f"stream entry '{kind}' has wrong fields: {exc}") from exc
