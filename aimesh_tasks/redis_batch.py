"""Commands from several modules sent to Redis in one pipelined round trip.

A round trip costs more than the command: on a loaded 2-core machine each one is two
context switches and a redis-py parse. The message path therefore gathers what it needs
at each step (dedup join, live figures, metered flag; then the records after a call) into
one `Batch`. Modules offer `queue_<op>(batch, ...)`, which adds commands and returns a
reader for their replies, valid after `batch.send()`.

Scripts go by EVALSHA. After a Redis restart or SCRIPT FLUSH an EVALSHA fails with
NOSCRIPT without having run; that one script is then run again on its own (loading it),
while the batch's other commands ran once. Nothing on the message path depends on the
order of a script against the batch's other commands.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import lru_cache
from typing import Any, TypeVar

import redis
from redis.commands.core import Script
from redis.exceptions import NoScriptError

from aimesh_tasks.redis_client import get_redis

T = TypeVar("T")
Reader = Callable[[], T]


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
        replies = self._pipe.execute(raise_on_error=False)  # nothing queued: no round trip
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
