"""Commands from several modules sent to Redis in one pipelined round trip.

A round trip costs more than the command: on a loaded 2-core machine each one is two
context switches and a redis-py parse. The message path therefore gathers what it needs
at each step (dedup join, live figures, metered flag; then the records after a call) into
one `Batch`. Modules offer `queue_<op>(batch, ...)`, which adds commands and returns a
reader for their replies, valid after `batch.send()`.

Writes that may wait (`defer`): a write whose loss costs nothing but a later, harmless
repair, and whose order against the path's other commands does not matter (the accepted
record's "finished" mark), rides this process's next `Batch` instead of a round trip of
its own; a flusher thread sends it within `FLUSH_AFTER_S` when no batch comes.

Scripts go by EVALSHA. After a Redis restart or SCRIPT FLUSH an EVALSHA fails with
NOSCRIPT without having run; that one script is then run again on its own (loading it),
while the batch's other commands ran once. Nothing on the message path depends on the
order of a script against the batch's other commands.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from functools import lru_cache
from typing import Any, TypeVar

import redis
from redis.commands.core import Script
from redis.exceptions import NoScriptError

from aimesh_tasks.redis_client import get_redis

T = TypeVar("T")
Reader = Callable[[], T]
logger = logging.getLogger(__name__)
FLUSH_AFTER_S = 0.2  # the longest a deferred write waits for a batch to ride
Command = tuple[Any, ...]


class _Deferred:
    """This process's deferred writes, by client, and the thread that flushes them."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.pending: dict[int, tuple[redis.Redis, list[Command]]] = {}
        self.arrived = threading.Event()
        self.flusher: threading.Thread | None = None

    def add(self, client: redis.Redis, command: Command) -> None:
        with self.lock:
            self.pending.setdefault(id(client), (client, []))[1].append(command)
            if self.flusher is None:
                self.flusher = threading.Thread(target=self._flush_loop, daemon=True,
                                                name="aimesh-deferred-writes")
                self.flusher.start()
        self.arrived.set()

    def take(self, client: redis.Redis | None = None) -> list[tuple[redis.Redis, list[Command]]]:
        """The pending writes for `client` (None: for every client), now this caller's."""
        with self.lock:
            if client is None:
                taken = list(self.pending.values())
                self.pending.clear()
            else:
                one = self.pending.pop(id(client), None)
                taken = [one] if one else []
            if not self.pending:
                self.arrived.clear()
        return taken

    def flush(self) -> None:
        """Send every pending write now, one round trip per Redis."""
        for client, commands in self.take():
            try:
                pipe = client.pipeline(transaction=False)
                for command in commands:
                    pipe.execute_command(*command)  # type: ignore[no-untyped-call]
                pipe.execute(raise_on_error=False)
            except Exception as exc:  # writes whose loss is harmless: logged, dropped
                logger.debug("redis_batch.deferred_lost", extra={
                    "writes": len(commands), "error": type(exc).__name__})

    def _flush_loop(self) -> None:
        while True:
            self.arrived.wait()
            time.sleep(FLUSH_AFTER_S)  # a batch may take them meanwhile
            self.flush()


_deferred = _Deferred()


def _forget_in_child() -> None:
    """A forked child starts with no writes of its parent's (the parent sends them) and
    no flusher (threads do not survive a fork)."""
    global _deferred
    _deferred = _Deferred()


os.register_at_fork(after_in_child=_forget_in_child)


def defer(*command: Any, client: redis.Redis | None = None) -> None:
    """Send a write later, on this process's next batch to the same Redis or within
    FLUSH_AFTER_S: only for writes whose loss is harmless (a failed one is logged and
    dropped) and whose order against other commands does not matter."""
    _deferred.add(client or get_redis(), command)


def flush_deferred() -> None:
    """Send every deferred write now, one round trip per Redis."""
    _deferred.flush()


@lru_cache(maxsize=32)
def registered_script(client: redis.Redis, source: str) -> Script:
    """The script object for `source` on `client` (its SHA computed once per process)."""
    return client.register_script(source)


class Batch:
    """Commands queued by index; replies readable by index after `send()`."""

    def __init__(self, client: redis.Redis | None = None) -> None:
        self._client = client or get_redis()
        self._pipe = self._client.pipeline(transaction=False)
        self._scripts: dict[int, tuple[Script, list[str], list[Any]]] = {}
        self._gets: dict[str, int] = {}
        self._replies: list[Any] | None = None

    def call(self, *command: Any) -> int:
        """Queue one command (name first); its reply's index."""
        self._pipe.execute_command(*command)  # type: ignore[no-untyped-call]
        return len(self._pipe) - 1

    def get(self, key: str) -> int:
        """Queue reading `key`, once per batch however many readers ask (for keys the batch
        does not also write: every reader sees the value from before the batch)."""
        if key not in self._gets:
            self._gets[key] = self.call("GET", key)
        return self._gets[key]

    def script(self, source: str, keys: list[str], args: list[Any]) -> int:
        """Queue a Lua script; its reply's index."""
        script = registered_script(self._client, source)
        index = self.call("EVALSHA", script.sha, len(keys), *keys, *args)
        self._scripts[index] = (script, keys, args)
        return index

    def send(self) -> None:
        """Send everything queued in one round trip. A command that fails raises its
        error after the whole batch has run."""
        if self._replies is not None:
            raise RuntimeError("this batch was sent already")
        own = len(self._pipe)
        for _, commands in _deferred.take(self._client):  # after this batch's own commands
            for command in commands:
                self._pipe.execute_command(*command)  # type: ignore[no-untyped-call]
        # nothing queued: no round trip; a deferred write's error is dropped
        replies = self._pipe.execute(raise_on_error=False)[:own]
        for index, reply in enumerate(replies):
            if isinstance(reply, NoScriptError) and index in self._scripts:
                script, keys, args = self._scripts[index]
                replies[index] = script(keys=keys, args=args)
            elif isinstance(reply, Exception):
                raise reply
        self._replies = replies

    def __getitem__(self, index: int) -> Any:
        if self._replies is None:
            raise RuntimeError("read a batch's replies after send()")
        return self._replies[index]


def send(queue: Callable[[Batch], object]) -> None:
    """One write-only module operation on its own."""
    batch = Batch()
    queue(batch)
    batch.send()


def run(queue: Callable[[Batch], Reader[T]]) -> T:
    """One module operation on its own: queue it, send, read."""
    batch = Batch()
    read = queue(batch)
    batch.send()
    return read()
