"""A message's stream on real Redis: the worker's writer, the ingress's reader (one XREAD
for all relays), the gone flag and the abort-mode watch. No workers."""

from __future__ import annotations

import asyncio
import threading
import uuid
from typing import Any

import pytest

from aimesh_tasks import keys
from aimesh_tasks.redis_batch import Batch
from aimesh_tasks.redis_client import get_redis
from aimesh_tasks.streams import reader as reader_module
from aimesh_tasks.streams.entries import Delta, End, Entry, Start
from aimesh_tasks.streams.reader import StreamReader
from aimesh_tasks.streams.watch import GoneWatch
from aimesh_tasks.streams.writer import Forwarder, queue_end, queue_failure, replay

pytestmark = pytest.mark.usefixtures("clean")
WAIT_S = 30


def _id() -> str:
    return f"stream-{uuid.uuid4().hex[:8]}"


async def _read(following: Any, count: int) -> list[Entry]:
    return [await asyncio.wait_for(following.next(), WAIT_S) for _ in range(count)]


def _reader() -> StreamReader:
    reader = StreamReader.for_settings()
    assert reader is not None, "the tests run on a real Redis"
    return reader


def test_deltas_arrive_in_order_with_their_start_and_offsets() -> None:
    message_id = _id()
    forward = Forwarder(message_id, f"{message_id}:0", "ep", "sim")
    for piece in ("Hello", " there", ""):
        forward(piece)
    batch = Batch()
    queue_end(batch, message_id, {"text": "Hello there"})
    batch.send()

    async def scenario() -> list[Entry]:
        reader = _reader()
        try:
            return await _read(await reader.follow(message_id), 4)
        finally:
            await reader.close()

    assert asyncio.run(scenario()) == [
        Start(f"{message_id}:0", "ep", "sim"), Delta(f"{message_id}:0", 0, "Hello"),
        Delta(f"{message_id}:0", 5, " there"), End({"text": "Hello there"})]
    assert forward.sent == 11 and forward.forwarding
    ttl = get_redis().ttl(keys.message_stream(message_id))
    assert 0 < ttl <= 300


def test_one_reader_serves_many_relays_and_wakes_for_a_new_one(
        monkeypatch: pytest.MonkeyPatch) -> None:
    # Without the wake, a relay added while the XREAD blocks would wait out the block.
    monkeypatch.setattr(reader_module, "BLOCK_MS", 3_600_000)
    first, second = _id(), _id()

    async def scenario() -> tuple[list[Entry], list[Entry]]:
        reader = _reader()
        try:
            one = await reader.follow(first)
            await asyncio.sleep(0.2)  # the reader is now blocked on `first` alone
            two = await reader.follow(second)
            await asyncio.to_thread(replay, second, f"{second}:0", "ep", "sim", "text")
            await asyncio.to_thread(replay, first, f"{first}:0", "ep", "sim", "")
            return await _read(one, 1), await _read(two, 2)
        finally:
            await reader.close()

    ones, twos = asyncio.run(scenario())
    assert ones == [Start(f"{first}:0", "ep", "sim")]
    assert twos == [Start(f"{second}:0", "ep", "sim"), Delta(f"{second}:0", 0, "text")]


def test_a_client_that_left_stops_the_forwarding_and_tells_the_call_once() -> None:
    message_id = _id()
    told: list[str] = []
    forward = Forwarder(message_id, f"{message_id}:0", "ep", "sim",
                        on_gone=lambda: told.append("gone"))
    forward("one ")

    async def leave() -> None:
        reader = _reader()
        try:
            reader.client_left(message_id)
        finally:
            await asyncio.sleep(0)
            await asyncio.gather(*reader._background)
            await reader.close()

    asyncio.run(leave())
    forward("two ")
    forward("three")
    assert told == ["gone"] and forward.gone and not forward.forwarding
    assert forward.sent == len("one two three")
    assert get_redis().xlen(keys.message_stream(message_id)) == 3  # start, one, two
    batch = Batch()
    queue_failure(batch, message_id, {"code": "provider_error", "message": "cancelled"})
    batch.send()
    assert get_redis().xlen(keys.message_stream(message_id)) == 4


def test_the_watch_sets_the_cancel_event_of_a_gone_client_at_once() -> None:
    watch = GoneWatch()
    message_id, early = _id(), _id()
    cancel, early_cancel = threading.Event(), threading.Event()
    get_redis().set(keys.stream_gone(early), "1")  # left before its call began
    with watch.watching(early, early_cancel):
        assert early_cancel.is_set()
    with watch.watching(message_id, cancel):
        assert not cancel.is_set()
        get_redis().publish(keys.streams_gone_channel(), message_id)
        assert cancel.wait(WAIT_S), "the watch did not hear the gone client"


def test_the_result_waiter_serves_more_reads_at_once_than_it_has_connections() -> None:
    from aimesh_tasks.app import app
    from aimesh_tasks.results import READ_CONNECTIONS, ResultWaiter

    async def scenario() -> list[Any]:
        waiter = ResultWaiter.for_app(app)
        try:  # 200 streams starting at once each read their result first
            return list(await asyncio.gather(*(waiter.peek(_id())
                                               for _ in range(3 * READ_CONNECTIONS))))
        finally:
            await waiter.close()

    assert asyncio.run(scenario()) == [None] * (3 * READ_CONNECTIONS)
