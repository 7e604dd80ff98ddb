"""Hearing at once that a flag was raised for a message: one subscriber thread per process.

A worker thread making a call that someone else may want stopped (a streaming call whose
client left: streams/watch.py; the losing call of a race: pipeline/race.py) registers a
`threading.Event` under the message id with `watching`. Whoever raises the flag sets a
Redis key and PUBLISHes the message id (on one channel, or on a channel of its own that a
pattern covers); the one subscriber thread of this process sets the event of every call of
that message watched here. Not a connection, nor a thread, per call: one pub/sub
connection per process, whatever the number of calls in flight.

`watching` checks the flag key itself once the subscription is live, so a flag raised
before the call began is seen too; after a lost subscription the thread subscribes again
and checks every watched flag.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import redis

from aimesh_tasks.redis_client import get_redis
from aimesh_tasks.settings import MEMORY_URL, get_settings

logger = logging.getLogger(__name__)
READY_TIMEOUT_S = 5.0
RESUBSCRIBE_S = 1.0


class FlagWatch:
    """The cancel events of the calls in flight in this process, by message id.

    `channel` is subscribed to (PSUBSCRIBEd when `pattern`), and each message's flag is
    the key `flag_key(message_id)`; `name` names the thread and the log lines."""

    def __init__(self, name: str, channel: str, flag_key: Callable[[str], str], *,
                 pattern: bool = False) -> None:
        self.name = name
        self.channel = channel
        self.flag_key = flag_key
        self.pattern = pattern
        self._pid = os.getpid()
        self._lock = threading.Lock()
        self._events: dict[str, set[threading.Event]] = {}
        self._ready = threading.Event()
        self._thread: threading.Thread | None = None

    @contextmanager
    def watching(self, message_id: str, cancel: threading.Event) -> Iterator[None]:
        """Set `cancel` when the message's flag is raised, while the block runs."""
        self._start()
        with self._lock:
            self._events.setdefault(message_id, set()).add(cancel)
        try:
            if get_redis().exists(self.flag_key(message_id)):
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
                self._thread = threading.Thread(target=self._run, name=f"aimesh-{self.name}",
                                                daemon=True)
                self._thread.start()
            ready = self._ready
        if not ready.wait(READY_TIMEOUT_S):
            logger.warning("%s.watch_not_ready", self.name)

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
                pipe.exists(self.flag_key(message_id))
            for message_id, raised in zip(watched, pipe.execute(), strict=True):
                if raised:
                    self._fire(message_id)

    def _run(self) -> None:
        while True:
            try:
                self._listen()
            except (redis.RedisError, OSError) as exc:
                logger.warning("%s.watch_lost", self.name, extra={"error": type(exc).__name__})
                time.sleep(RESUBSCRIBE_S)

    def _listen(self) -> None:
        # Through Any: redis-py before 8.2 leaves pubsub() untyped, 8.2 types it, so an
        # ignore for the one is an unused ignore for the other.
        client: Any = _subscriber()
        pubsub = client.pubsub()
        try:
            if self.pattern:
                pubsub.psubscribe(self.channel)
            else:
                pubsub.subscribe(self.channel)
            for message in pubsub.listen():
                if message["type"] in ("subscribe", "psubscribe"):
                    self._recheck()
                    self._ready.set()
                elif message["type"] in ("message", "pmessage"):
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
