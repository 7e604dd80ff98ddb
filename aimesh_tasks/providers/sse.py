"""Server-Sent Events for streamed provider answers (pure: no I/O).

`SseDecoder` turns the lines of a `text/event-stream` body, as the transport hands them
over (providers/aio.py `on_line`: bytes, newline stripped), into `SseEvent`s, following the
WHATWG rules the providers rely on: `event:` names the event, `data:` lines are joined
with "\\n", a blank line dispatches, a line starting with ":" is a comment (a keep-alive),
one space after the colon is dropped, and a trailing "\\r" (a CRLF stream) is ignored.

`StreamState` is what every adapter's stream parser accumulates while it reads its
provider's events: the text so far, the usage once the provider sent it, the finish
reason, and whether the provider's terminal event arrived (`ended`). A parser that meets
an error reported inside the stream (Anthropic's `event: error`, an OpenAI-style
`{"error": ...}` chunk) raises `StreamFailed` with the provider's error body, which the
adapter's `classify_error` reads like the body of a failed answer.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from aimesh_tasks.providers.base import Completion

# An error reported inside a 200 stream is read as the provider's own server error,
# refined by its body (adapters classify by the body's error type where it has one).
IN_STREAM_ERROR_STATUS = 500


@dataclass(frozen=True, slots=True)
class SseEvent:
    """One dispatched event: its name ('' when the stream names none) and its data."""

    event: str
    data: str

    def json(self) -> dict[str, Any]:
        """The data as a JSON object; ValueError naming the event if it is not one."""
        name = self.event or "data"
        try:
            data = json.loads(self.data)
        except ValueError as exc:
            raise ValueError(f"stream event '{name}' is not JSON: {self.data[:80]!r}") from exc
        if not isinstance(data, dict):
            raise ValueError(f"malformed stream: event '{name}' is not a JSON object")
        return data


class StreamFailed(Exception):
    """The provider reported an error inside its stream; `body` is its error object."""

    def __init__(self, body: Any) -> None:
        super().__init__(f"error reported in the stream: {str(body)[:200]}")
        self.body = body


class SseDecoder:
    """Lines in, events out: `feed(line)` gives the event a blank line dispatches."""

    def __init__(self) -> None:
        self._event = ""
        self._data: list[str] = []

    def feed(self, line: bytes) -> SseEvent | None:
        """Take one line (without its newline); the event it completes, if any."""
        text = line.decode("utf-8", "replace").removesuffix("\r")
        if not text:
            return self._dispatch()
        if text.startswith(":"):
            return None
        name, _, value = text.partition(":")
        value = value.removeprefix(" ")
        if name == "event":
            self._event = value
        elif name == "data":
            self._data.append(value)
        return None

    def close(self) -> SseEvent | None:
        """The end of the body: an event left without its blank line is dispatched (a
        server that closes right after its last `data:` line)."""
        return self._dispatch()

    def _dispatch(self) -> SseEvent | None:
        event, data = self._event, self._data
        self._event, self._data = "", []
        if not data:
            return None
        return SseEvent(event, "\n".join(data))


@dataclass(slots=True)
class StreamState:
    """What a stream has given so far (see the module docstring)."""

    parts: list[str] = field(default_factory=list)
    input_tokens: int = 0
    output_tokens: int = 0
    usage_known: bool = False
    finish_reason: str | None = None
    model: str = ""
    request_id: str | None = None
    ended: bool = False

    def add(self, text: str) -> str:
        """Keep a text delta; the delta."""
        if text:
            self.parts.append(text)
        return text

    def usage(self, input_tokens: int, output_tokens: int) -> None:
        """The provider's usage figures (the latest replace earlier ones)."""
        self.input_tokens, self.output_tokens, self.usage_known = (
            input_tokens, output_tokens, True)

    def completion(self) -> Completion:
        """The completion the stream made (so far, if it has not ended)."""
        return Completion(text="".join(self.parts), input_tokens=self.input_tokens,
                          output_tokens=self.output_tokens, model=self.model,
                          finish_reason=self.finish_reason, request_id=self.request_id,
                          usage_known=self.usage_known)


class ParsedStream:
    """What the adapters' stream parsers share: the state they fill, the answer so far,
    and `ended` once the state says the provider's terminal event came."""

    def __init__(self) -> None:
        self.state = StreamState()

    @property
    def ended(self) -> bool:
        """The provider's terminal event arrived."""
        return self.state.ended

    def completion(self) -> Completion:
        """The answer so far."""
        return self.state.completion()


def count(value: Any, name: str) -> int:
    """A token count from a usage object: a non-negative int (0 when absent)."""
    if value is None:
        return 0
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"malformed stream: usage {name} is {value!r}, not a count")
    return value
