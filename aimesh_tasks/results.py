"""Awaiting many messages' results on one event loop, without a thread per wait.

On a Redis result backend, Celery stores a result with SET and PUBLISHes it on the same
key (`celery-task-meta-<id>`). `ResultWaiter` holds one pub/sub connection for every
wait of the process: a wait subscribes to its message's channel, reads the key once (the
result may be there already), then sleeps until the publish arrives, re-reading the key
every AIMESH_INGRESS_RESULT_POLL_S in case a publish was missed (a reconnect). On any
other backend (the embedded in-memory one) it polls `AsyncResult.ready()` in a thread.

    waiter = ResultWaiter.for_app(app)
    finished = await waiter.wait(message_id, timeout_s=30)   # None: not yet
    finished.result  -> the AiResult dict, or the AimeshError that ended the message
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis
from celery import Celery, states

logger = logging.getLogger(__name__)
EMBEDDED_POLL_S = 0.02
# Connections for the waits' reads: more waits than this queue for one (redis-py's plain
# pool would refuse the 101st read under way with MaxConnectionsError).
READ_CONNECTIONS = 64


@dataclass(frozen=True, slots=True)
class Finished:
    """A message's final state: SUCCESS with the result dict, or FAILURE with the error."""

    state: str
    result: Any

    @property
    def ok(self) -> bool:
        return bool(self.state == states.SUCCESS)


class ResultWaiter:
    """Waits for task results; one instance per process and event loop."""

    def __init__(self, app: Celery, poll_s: float) -> None:
        self.app = app
        self.poll_s = poll_s
        url = str(app.conf.result_backend or "")
        self._redis = (aioredis.Redis.from_pool(aioredis.BlockingConnectionPool.from_url(
            url, max_connections=READ_CONNECTIONS, timeout=None, socket_keepalive=True))
            if url.startswith(("redis://", "rediss://", "unix://")) else None)
        self._pubsub: Any = None
        self._reader: asyncio.Task[None] | None = None
        self._waiting: dict[str, set[asyncio.Future[None]]] = {}

    @classmethod
    def for_app(cls, app: Celery, poll_s: float = 1.0) -> ResultWaiter:
        """A waiter on `app`'s result backend."""
        return cls(app, poll_s)

    async def peek(self, task_id: str) -> Finished | None:
        """The result if the message has finished, else None (no waiting)."""
        if self._redis is None:
            return await asyncio.to_thread(self._peek_sync, task_id)
        raw = await self._redis.get(self._key(task_id))
        return self._decode(raw)

    async def wait(self, task_id: str, timeout_s: float) -> Finished | None:
        """The result once the message finished, or None after `timeout_s`."""
        if self._redis is None:
            return await self._poll(task_id, timeout_s)
        deadline = time.monotonic() + timeout_s
        woken = asyncio.get_running_loop().create_future()
        await self._subscribe(task_id, woken)
        try:
            while True:
                found = await self.peek(task_id)
                left = deadline - time.monotonic()
                if found is not None or left <= 0:
                    return found
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(asyncio.shield(woken), min(self.poll_s, left))
        finally:
            await self._unsubscribe(task_id, woken)

    async def close(self) -> None:
        """Stop the reader and close the connections."""
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._reader
        if self._pubsub is not None:
            await self._pubsub.aclose()
        if self._redis is not None:
            await self._redis.aclose()

    def _key(self, task_id: str) -> str:
        key = self.app.backend.get_key_for_task(task_id)
        return key.decode() if isinstance(key, bytes) else str(key)

    def _decode(self, raw: bytes | str | None) -> Finished | None:
        if raw is None:
            return None
        meta = self.app.backend.decode_result(raw)
        if meta["status"] not in states.READY_STATES:
            return None
        return Finished(state=meta["status"], result=meta["result"])

    def _peek_sync(self, task_id: str) -> Finished | None:
        pending = self.app.AsyncResult(task_id)
        if pending.state not in states.READY_STATES:
            return None
        return Finished(state=pending.state, result=pending.result)

    async def _poll(self, task_id: str, timeout_s: float) -> Finished | None:
        deadline = time.monotonic() + timeout_s
        while True:
            found = await self.peek(task_id)
            if found is not None or time.monotonic() >= deadline:
                return found
            await asyncio.sleep(EMBEDDED_POLL_S)

    async def _subscribe(self, task_id: str, woken: asyncio.Future[None]) -> None:
        assert self._redis is not None
        waiting = self._waiting.setdefault(task_id, set())
        waiting.add(woken)
        if len(waiting) > 1:
            return
        if self._pubsub is None:
            self._pubsub = self._redis.pubsub(ignore_subscribe_messages=True)
        await self._pubsub.subscribe(self._key(task_id))
        if self._reader is None or self._reader.done():
            self._reader = asyncio.create_task(self._read(), name="aimesh-result-reader")

    async def _unsubscribe(self, task_id: str, woken: asyncio.Future[None]) -> None:
        waiting = self._waiting.get(task_id, set())
        waiting.discard(woken)
        if not waiting:
            self._waiting.pop(task_id, None)
            with contextlib.suppress(Exception):  # the fallback re-read covers a lost one
                await self._pubsub.unsubscribe(self._key(task_id))

    async def _read(self) -> None:
        """Wake the waits of every message whose result is published."""
        prefix = len(self._key("x")) - 1
        while self._waiting:
            try:
                message = await self._pubsub.get_message(timeout=self.poll_s)
            except (aioredis.RedisError, OSError, RuntimeError) as exc:
                logger.warning("results.pubsub_failed", extra={"error": type(exc).__name__})
                await asyncio.sleep(self.poll_s)
                continue
            if message is None or message.get("type") != "message":
                continue
            channel = message["channel"]
            task_id = (channel.decode() if isinstance(channel, bytes) else channel)[prefix:]
            for woken in self._waiting.get(task_id, ()):
                if not woken.done():
                    woken.set_result(None)
