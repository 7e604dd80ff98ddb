"""Hearing at once that a streaming call's client left (worker side, abort mode).

With AIMESH_STREAM_ON_DISCONNECT=abort a call is aborted when its client leaves, also
while the provider sends nothing (the forwarder only looks at the gone flag when it
forwards a delta). The ingress PUBLISHes the message id on `keys.streams_gone_channel()`
when it sets the flag; one subscriber thread per worker process sets the cancel event of
every call of that message watched here. `watching` checks the flag itself once the
subscription is live, so a client that left before the call began is seen too; after a
lost subscription the thread subscribes again and checks every watched flag.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import redis

from aimesh_tasks import keys
from aimesh_tasks.redis_client import get_redis
from aimesh_tasks.settings import MEMORY_URL, get_settings

logger = logging.getLogger(__name__)
READY_TIMEOUT_S = 5.0
RESUBSCRIBE_S = 1.0


class GoneWatch:
    """The cancel events of the streaming calls in flight in this process, by message."""

    def __init__(self) -> None:
        self._pid = os.getpid()
        self._lock = threading.Lock()
        self._events: dict[str, set[threading.Event]] = {}
        self._ready = threading.Event()
        self._thread: threading.Thread | None = None

    @contextmanager
    def watching(self, message_id: str, cancel: threading.Event) -> Iterator[None]:
        """Set `cancel` when the message's client leaves, while the block runs."""
        self._start()
        with self._lock:
            self._events.setdefault(message_id, set()).add(cancel)
        try:
            if get_redis().exists(keys.stream_gone(message_id)):
                cancel.set()
            yield
        finally:
            with self._lock:
                waiting = self._events.get(message_id, set())
                waiting.discard(cancel)
                if not waiting:
                    self._events.pop(message_id, None)

    def _start(self) -> None:
        with self._lock:
            if self._pid != os.getpid():  # forked: the parent's thread is not here
                self._pid, self._events, self._thread = os.getpid(), {}, None
                self._ready = threading.Event()
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="aimesh-stream-gone",
                                                daemon=True)
                self._thread.start()
            ready = self._ready
        if not ready.wait(READY_TIMEOUT_S):
            logger.warning("streams.watch_not_ready")  # the per-delta flag check remains

    def _fire(self, message_id: str) -> None:
        with self._lock:
            events = list(self._events.get(message_id, ()))
        for event in events:
            event.set()

    def _recheck(self) -> None:
        """After (re)subscribing: every watched message whose flag is already set."""
        with self._lock:
            watched = list(self._events)
        if watched:
            pipe = get_redis().pipeline(transaction=False)
            for message_id in watched:
                pipe.exists(keys.stream_gone(message_id))
            for message_id, gone in zip(watched, pipe.execute(), strict=True):
                if gone:
                    self._fire(message_id)

    def _run(self) -> None:
        while True:
            try:
                self._listen()
            except (redis.RedisError, OSError) as exc:
                logger.warning("streams.watch_lost", extra={"error": type(exc).__name__})
                time.sleep(RESUBSCRIBE_S)

    def _listen(self) -> None:
        pubsub: Any = _subscriber().pubsub()  # type: ignore[no-untyped-call]
        try:
            pubsub.subscribe(keys.streams_gone_channel())
            for message in pubsub.listen():
                if message["type"] == "subscribe":
                    self._recheck()
                    self._ready.set()
                elif message["type"] == "message":
                    self._fire(str(message["data"]))
        finally:
            pubsub.close()


def _subscriber() -> redis.Redis:
    """A client for the subscription: no socket timeout (it waits for news as long as
    there is none), TCP keep-alive to notice a dead peer."""
    url = get_settings().redis_url
    if url.startswith(MEMORY_URL):
        return get_redis()
    return redis.Redis.from_url(url, decode_responses=True, socket_keepalive=True,
                                socket_connect_timeout=get_settings().redis_timeout_s)


WATCH = GoneWatch()
