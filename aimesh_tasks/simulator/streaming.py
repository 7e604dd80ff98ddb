"""Streamed answers of every wire format: written event by event, paused on request, and
billed for what was written when the client goes away.

Each format cuts its answer into `Piece`s (one SSE event each, with the completion words
it carries; `tail` marks what comes after the text: the finish reason, the usage, the end
marker) and hands them to `stream`, which writes them one by one, flushing each.

Pausing (`SimulatorConfig.hold_after_words`): once that many words are written, a stream
waits before its next text piece; a shorter answer waits before its tail (for Gemini the
last chunk, which carries the last word with the finish reason and usage). It waits once,
until `POST /_sim/release` (`RunningSimulator.release()`). A test can so prove that text
reaches a client while the provider's call is still open, and cut a stream at an exact
word.

Billing rule for a stream the client cuts off: the call is billed its prompt tokens and
the completion words written before the simulator saw the disconnect (a failed write, or
the client closing while the stream is paused or between spaced words:
`word_interval_ms`); the call log records those figures with
`"disconnected": true`, and the `disconnected` counter counts such calls. A stream that
ends normally is billed its whole completion, as a non-streamed answer is.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

from aiohttp import web

if TYPE_CHECKING:
    from aimesh_tasks.simulator.server import Call, SimState

SSE_HEADERS: Final = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
# A paused stream looks this often whether its client is still there (aiohttp offers no
# awaitable for a peer that closed while the handler writes nothing).
GONE_CHECK_S: Final = 0.05


@dataclass(frozen=True, slots=True)
class Piece:
    """One event of a streamed answer: its bytes on the wire, the words it carries, and
    whether it comes after the text (finish reason, usage, end marker)."""

    data: bytes
    words: int = 0
    tail: bool = False


@dataclass(frozen=True, slots=True)
class Billing:
    """What the call is billed when the stream ends: the model, its prompt tokens."""

    model: str
    prompt_tokens: int


class Holds:
    """The streams paused at `hold_after_words`, and the release that wakes them."""

    def __init__(self) -> None:
        self.count = 0
        self._release = asyncio.Event()

    async def wait(self, request: web.BaseRequest) -> None:
        """Pause until the next release; ConnectionResetError if the client goes first."""
        release = self._release
        self.count += 1
        try:
            while not release.is_set():
                if client_gone(request):
                    raise ConnectionResetError("the client went away during the pause")
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(release.wait(), GONE_CHECK_S)
        finally:
            self.count -= 1

    def release(self) -> int:
        """Wake every paused stream (later streams pause again); how many were paused."""
        woken = self.count
        self._release.set()
        self._release = asyncio.Event()
        return woken


def client_gone(request: web.BaseRequest) -> bool:
    """Whether the caller has closed the request's connection (aborted its call)."""
    transport = request.transport
    return transport is None or transport.is_closing()


def _pauses(piece: Piece, written: int, hold_after: int | None, held: bool) -> bool:
    return hold_after is not None and not held and (
        piece.tail or (piece.words > 0 and written >= hold_after))


async def stream(state: SimState, call: Call, request: web.Request, pieces: Iterable[Piece],
                 billing: Billing, headers: dict[str, str] | None = None
                 ) -> web.StreamResponse:
    """Write `pieces` as a 200 event stream; record the call when it ends or is cut."""
    response = web.StreamResponse(headers={**SSE_HEADERS, **(headers or {})})
    written, held = 0, False
    try:
        await response.prepare(request)
        for piece in pieces:
            if _pauses(piece, written, state.config.hold_after_words, held):
                held = True
                await state.holds.wait(request)
            if piece.words and written and state.config.word_interval_ms:
                await asyncio.sleep(state.config.word_interval_ms / 1000)
            await response.write(piece.data)
            written += piece.words
        await response.write_eof()
    except ConnectionError:  # the client went away: logged `disconnected`, nothing to send
        state.finish(call, 200, billing.model, billing.prompt_tokens, written)
        return response
    state.finish(call, 200, billing.model, billing.prompt_tokens, written)
    return response
