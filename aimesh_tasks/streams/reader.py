"""Reading message streams on an event loop (ingress side): one XREAD BLOCK per process.

`StreamReader` serves every relay of the process from one task: it reads all followed
streams with one blocking XREAD (redis.asyncio), from the last entry id each has seen
(from the start for a new one, so nothing written before it followed is missed), and
puts each decoded entry on its follower's queue. A follower added while the XREAD blocks
wakes it through the reader's own wake stream. No thread and no connection per relay.

    reader = StreamReader.for_settings()        # None: no Redis (embedded mode)
    following = await reader.follow(message_id)
    entry = await following.next()               # Start, Delta, End or Failure
    following.close()
    reader.client_left(message_id)               # the gone flag + PUBLISH (workers hear)
    reader.relayed(message_id)                   # relayed to its end: delete it
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import Coroutine
from typing import Any

import redis.asyncio as aioredis

from aimesh_tasks import keys
from aimesh_tasks.settings import MEMORY_URL, get_settings
from aimesh_tasks.streams.entries import FIELD, Entry, decode

logger = logging.getLogger(__name__)
BLOCK_MS = 5000
READ_COUNT = 256
RETRY_S = 0.5
WAKE_TTL_S = 60
WAKE_MAXLEN = 16
CONNECTIONS = 32


class Following:
    """One relay's view of a message's stream: its entries, in order."""

    def __init__(self, reader: StreamReader, message_id: str) -> None:
        self.message_id = message_id
        self.entries: asyncio.Queue[Entry] = asyncio.Queue()
        self._reader = reader

    async def next(self) -> Entry:
        """The next entry (waits for it)."""
        return await self.entries.get()

    def close(self) -> None:
        """Stop following."""
        self._reader.unfollow(self)


class StreamReader:
    """The message streams this process relays, read by one task (see the module)."""

    def __init__(self, url: str) -> None:
        # No socket timeout shorter than the block; keep-alive notices a dead peer; the
        # deletes and flags of many relays ending at once queue for a connection.
        self._redis = aioredis.Redis.from_pool(aioredis.BlockingConnectionPool.from_url(
            url, max_connections=CONNECTIONS, timeout=None, decode_responses=True,
            socket_keepalive=True, socket_timeout=BLOCK_MS / 1000 + 10))
        self._wake = keys.stream_reader_wake(uuid.uuid4().hex)
        self._wake_seen = "0-0"
        self._last: dict[str, str] = {}  # message id -> last entry id read
        self._followers: dict[str, set[Following]] = {}
        self._task: asyncio.Task[None] | None = None
        self._background: set[asyncio.Task[Any]] = set()

    @classmethod
    def for_settings(cls) -> StreamReader | None:
        """A reader on AIMESH_REDIS_URL; None when that is the in-process store (embedded
        mode has no Redis another process could write to)."""
        url = get_settings().redis_url
        return None if url.startswith(MEMORY_URL) else cls(url)

    async def follow(self, message_id: str) -> Following:
        """Follow a message's stream from its first entry."""
        following = Following(self, message_id)
        self._followers.setdefault(message_id, set()).add(following)
        self._last.setdefault(message_id, "0-0")
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._run(), name="aimesh-stream-reader")
        else:
            await self._wake_up()
        return following

    def unfollow(self, following: Following) -> None:
        """Stop giving `following` entries (its stream is dropped from the next read)."""
        followers = self._followers.get(following.message_id, set())
        followers.discard(following)
        if not followers:
            self._followers.pop(following.message_id, None)
            self._last.pop(following.message_id, None)

    def client_left(self, message_id: str) -> None:
        """Tell the workers that the message's client went away: the gone flag (for a
        worker to look at) and a PUBLISH (for one aborting on disconnect to hear at once).
        Runs as its own task: the caller is usually being cancelled."""
        self._later(self._mark_gone(message_id))

    def relayed(self, message_id: str) -> None:
        """The message's stream was relayed to its end: delete it now rather than let it
        wait for its expiry (a late replay of a redelivered call writes a new one, which
        expires unread)."""
        self._later(self._delete(message_id))

    def _later(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(work)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _delete(self, message_id: str) -> None:
        try:
            await self._redis.delete(keys.message_stream(message_id))
        except (aioredis.RedisError, OSError) as exc:  # it expires anyway
            logger.warning("streams.not_deleted", extra={
                "message_id": message_id, "error": type(exc).__name__})

    async def close(self) -> None:
        """Stop reading; close the connections."""
        for task in (self._task, *self._background):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
        await self._redis.aclose()

    async def _mark_gone(self, message_id: str) -> None:
        try:
            pipe = self._redis.pipeline(transaction=False)
            pipe.set(keys.stream_gone(message_id), "1", ex=get_settings().stream_ttl_s)
            pipe.publish(keys.streams_gone_channel(), message_id)
            await pipe.execute()
        except (aioredis.RedisError, OSError) as exc:
            logger.warning("streams.gone_not_marked", extra={
                "message_id": message_id, "error": type(exc).__name__})

    async def _wake_up(self) -> None:
        pipe = self._redis.pipeline(transaction=False)
        pipe.xadd(self._wake, {"w": "1"}, maxlen=WAKE_MAXLEN, approximate=True)
        pipe.expire(self._wake, WAKE_TTL_S)
        await pipe.execute()

    async def _run(self) -> None:
        while self._followers:
            streams: dict[Any, Any] = {self._wake: self._wake_seen,
                       **{keys.message_stream(m): last for m, last in self._last.items()}}
            try:
                replies: Any = await self._redis.xread(streams, count=READ_COUNT,
                                                       block=BLOCK_MS)
            except (aioredis.RedisError, OSError) as exc:
                logger.warning("streams.read_failed", extra={"error": type(exc).__name__})
                await asyncio.sleep(RETRY_S)
                continue
            for stream, items in replies or []:
                self._dispatch(stream, items)

    def _dispatch(self, stream: str, items: list[tuple[str, dict[str, str]]]) -> None:
        if stream == self._wake:
            self._wake_seen = items[-1][0]
            return
        message_id = stream[len(keys.message_stream("")):]
        if message_id not in self._last:
            return  # unfollowed while the read was under way
        self._last[message_id] = items[-1][0]
        for entry_id, fields in items:
            try:
                entry = decode(fields[FIELD])
            except (KeyError, ValueError) as exc:
                logger.warning("streams.bad_entry", extra={
                    "message_id": message_id, "entry_id": entry_id, "error": str(exc)})
                continue
            for following in self._followers.get(message_id, ()):
                following.entries.put_nowait(entry)
