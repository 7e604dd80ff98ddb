"""`stream: true` through the queue: the worker's deltas relayed as OpenAI chunks.

The message is queued with `stream` set; the relay follows its Redis stream
(aimesh_tasks/streams) and awaits its result at once, and the first of them decides:

| first                           | answer                                                 |
|---------------------------------|--------------------------------------------------------|
| a call's start or text          | 200 `text/event-stream`: the role, each delta as it    |
|                                 | arrives, then the finish reason and (with              |
|                                 | include_usage) the usage chunk once the call settled   |
| the result (a cache or dedup    | 200 `text/event-stream` of the whole text in pieces,   |
| hit, a follower of a flight)    | as a live answer ends                                  |
| the message's error             | that error's status, as without streaming              |
| nothing within the wait         | 504 naming the message id to poll                      |

Once text was sent the status is spoken: a later failure is an `{"error": ...}` chunk
(the SDKs raise it), and the stream ends. Deltas carry their offset in their call's text,
so text the client has is never sent twice (a redelivered call replays its journal) and
a gap (entries trimmed before they were read) is filled from the final text; a call made
again whose text does not agree with what was sent ends the stream with an error naming
where the whole answer is.

A client that goes away (before or while it is streamed to) is told to the workers
(`StreamReader.client_left`); the call goes on or is aborted as AIMESH_STREAM_ON_DISCONNECT
says, and is charged either way.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import Request
from fastapi.responses import Response, StreamingResponse

from aimesh_tasks.errors import AimeshError, DeadlineExceeded, error_from_dict
from aimesh_tasks.ingress.errors import failure_body, failure_response
from aimesh_tasks.ingress.openai_shapes import Chunks, chunks
from aimesh_tasks.results import Finished, ResultWaiter
from aimesh_tasks.streams.entries import Delta, End, Entry, Failure, Start
from aimesh_tasks.streams.reader import Following, StreamReader

Event = Entry | Finished | None  # None: the wait is over
GONE = object()  # the client went away before the answer began
SSE_HEADERS = {"Cache-Control": "no-cache"}


class Diverged(Exception):
    """Text that does not continue what the client was already sent."""


class RelayText:
    """What the client was sent of the answer's text, and what of new text it lacks."""

    def __init__(self) -> None:
        self.sent = ""

    def offer(self, at: int, text: str) -> str:
        """The part of a delta (`text` starting `at` characters into the answer) the
        client does not have; '' for text it has, or past a gap (filled at the end)."""
        have = len(self.sent)
        if at > have:
            return ""
        overlap = self.sent[at:]
        if not (text.startswith(overlap) or overlap.startswith(text)):
            raise Diverged(f"text at {at} differs from what was sent")
        new = text[have - at:]
        self.sent += new
        return new

    def complete(self, whole: str) -> str:
        """The rest of the answer's final text after what was sent."""
        if not whole.startswith(self.sent):
            raise Diverged("the final text does not begin with what was sent")
        rest = whole[len(self.sent):]
        self.sent = whole
        return rest


def sse(chunk: dict[str, Any] | str) -> bytes:
    """One server-sent event."""
    data = chunk if isinstance(chunk, str) else json.dumps(chunk, separators=(",", ":"))
    return f"data: {data}\n\n".encode()


async def whole_answer(result: dict[str, Any], include_usage: bool) -> AsyncIterator[bytes]:
    """A finished answer as a stream: the text in pieces, then the end."""
    for chunk in chunks(result, include_usage):
        yield sse(chunk)
    yield sse("[DONE]")


async def _client_gone(request: Request) -> None:
    """Returns when the client closes its connection (the body was read already)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


class Relay:
    """One streaming message, from its stream and its result to the client's SSE."""

    def __init__(self, streams: StreamReader, following: Following, waiter: ResultWaiter,
                 include_usage: bool, wait_s: float) -> None:
        self.streams = streams
        self.following = following
        self.message_id = following.message_id
        self.include_usage = include_usage
        self.text = RelayText()
        self.deadline = time.monotonic() + wait_s
        self._entry: asyncio.Task[Entry] | None = None
        self._result = asyncio.create_task(waiter.wait(self.message_id, wait_s))
        self._chunks: Chunks | None = None
        self._endpoint = ""

    async def next_event(self, *also: asyncio.Future[Any]) -> Event | object:
        """The next entry of the stream, else the result, else GONE (one of `also`
        ended first), else None when the wait is over."""
        if self._entry is None:
            self._entry = asyncio.create_task(self.following.next())
        left = self.deadline - time.monotonic()
        if left <= 0:
            return None
        done, _ = await asyncio.wait({self._entry, self._result, *also}, timeout=left,
                                     return_when=asyncio.FIRST_COMPLETED)
        if self._entry in done:
            entry, self._entry = self._entry.result(), None
            return entry
        if self._result in done:
            return self._result.result()
        return GONE if done else None

    def close(self) -> None:
        """Stop following and waiting."""
        for task in (self._entry, self._result):
            if task is not None:
                task.cancel()
        self.following.close()

    async def respond(self, request: Request) -> Response:
        """The response the first event decides (see the module table)."""
        gone = asyncio.create_task(_client_gone(request))
        try:
            first = await self.next_event(gone)
            while isinstance(first, Start):  # a call's start comes with its first delta
                self._begin(first)
                first = await self.next_event(gone)
        except BaseException:
            self.close()
            raise
        finally:
            gone.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await gone
        if not isinstance(first, Delta):
            self.close()
            return self._answered(first)
        if self._chunks is None:  # its start was trimmed away
            self._begin(Start(first.call, "", ""))
        headers = {**SSE_HEADERS, "X-Aimesh-Message-Id": self.message_id,
                   "X-Aimesh-Endpoint": self._endpoint}
        return StreamingResponse(self._live(first), media_type="text/event-stream",
                                 headers=headers)

    def _begin(self, start: Start) -> None:
        self._endpoint = start.endpoint_id
        self._chunks = Chunks(self.message_id, start.model, int(time.time()),
                              self.include_usage)

    def _answered(self, first: Event | object) -> Response:
        """The response when no text came first: the result, the error or the wait."""
        if first is GONE:
            self.streams.client_left(self.message_id)
            return Response(status_code=499)  # nobody reads it
        if isinstance(first, End | Failure | Finished):  # a stream may have begun meanwhile
            self.streams.relayed(self.message_id)
        result, error = _outcome(first)
        if result is not None:
            return StreamingResponse(whole_answer(result, self.include_usage),
                                     media_type="text/event-stream",
                                     headers={**SSE_HEADERS,
                                              "X-Aimesh-Message-Id": self.message_id,
                                              "X-Aimesh-Endpoint": str(result["endpoint_id"])})
        return failure_response(error or still_waiting_error(self.message_id))

    async def _live(self, first: Delta) -> AsyncIterator[bytes]:
        assert self._chunks is not None
        ended = False
        try:
            yield sse(self._chunks.role())
            event: Event | object = first
            while True:
                out, ended = self._step(event)
                for item in out:
                    yield item
                if ended:
                    self.streams.relayed(self.message_id)
                    return
                event = await self.next_event()
        finally:
            self.close()
            if not ended:  # the client left mid-stream (the generator was closed)
                self.streams.client_left(self.message_id)

    def _step(self, event: Event | object) -> tuple[list[bytes], bool]:
        """What one event sends, and whether the stream ends with it."""
        assert self._chunks is not None
        try:
            if isinstance(event, Delta):
                piece = self.text.offer(event.at, event.text)
                return ([sse(self._chunks.text(piece))] if piece else []), False
            if isinstance(event, Start):
                return [], False
            result, error = _outcome(event)
            if result is not None:
                rest = self.text.complete(str(result["text"]))
                out = [self._chunks.text(rest)] if rest else []
                return [*map(sse, [*out, *self._chunks.ending(result)]), sse("[DONE]")], True
        except Diverged:
            error = AimeshError(
                f"message {self.message_id}: its call was made again and answered other "
                "text than the one sent; the whole answer is at GET /v1/aimesh/messages/"
                f"{self.message_id}", message_id=self.message_id)
        return [sse(failure_body(error or still_waiting_error(self.message_id)))], True


def _outcome(event: Event | object) -> tuple[dict[str, Any] | None, BaseException | None]:
    """(result, error) of an event that ends the message; (None, None) for the wait."""
    if isinstance(event, End):
        return event.result, None
    if isinstance(event, Failure):
        return None, error_from_dict(event.error)
    if isinstance(event, Finished):
        return (event.result, None) if event.ok else (None, event.result)
    return None, None


def still_waiting_error(message_id: str) -> DeadlineExceeded:
    """The error of a message not answered within the ingress's wait (it stays queued)."""
    return DeadlineExceeded(
        f"no answer within the ingress's wait (AIMESH_INGRESS_WAIT_S); message "
        f"{message_id} is still queued or running: GET /v1/aimesh/messages/{message_id}",
        message_id=message_id)
