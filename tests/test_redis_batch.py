"""One round trip for several modules' commands (aimesh_tasks/redis_batch.py), on real Redis."""

from __future__ import annotations

import pytest
from redis.exceptions import ResponseError

from aimesh_tasks.redis_batch import Batch
from aimesh_tasks.redis_client import get_redis

COUNT = "return redis.call('INCR', KEYS[1])"


def test_after_a_script_flush_every_command_in_the_batch_runs_once(clean: None) -> None:
    client = get_redis()
    client.delete("batch-test:list", "batch-test:counter")
    client.script_flush()  # as after a Redis restart: EVALSHA answers NOSCRIPT
    batch = Batch()
    pushed = batch.call("RPUSH", "batch-test:list", "record")
    counted = batch.script(COUNT, ["batch-test:counter"], [])
    batch.send()
    assert (batch[pushed], batch[counted]) == (1, 1)
    assert client.lrange("batch-test:list", 0, -1) == ["record"]  # not pushed twice
    assert client.get("batch-test:counter") == "1"

    again = Batch()  # the script is loaded now and runs by its SHA
    counted = again.script(COUNT, ["batch-test:counter"], [])
    again.send()
    assert again[counted] == 2


def test_a_failing_command_raises_and_replies_are_read_only_after_one_send(clean: None) -> None:
    client = get_redis()
    client.set("batch-test:string", "x")
    batch = Batch()
    index = batch.call("LPUSH", "batch-test:string", "y")  # wrong type
    with pytest.raises(RuntimeError, match="after send"):
        batch[index]
    with pytest.raises(ResponseError, match="WRONGTYPE"):
        batch.send()

    sent = Batch()
    sent.call("GET", "batch-test:string")
    sent.send()
    assert sent[0] == "x"
    with pytest.raises(RuntimeError, match="sent already"):
        sent.send()


def test_readers_of_one_key_share_one_get(clean: None) -> None:
    client = get_redis()
    client.set("batch-test:version", "v1")
    batch = Batch()
    first, second = batch.get("batch-test:version"), batch.get("batch-test:version")
    other = batch.get("batch-test:absent")
    assert first == second and other != first
    assert len(batch._pipe) == 2  # two keys, two GETs queued
    batch.send()
    assert (batch[first], batch[second], batch[other]) == ("v1", "v1", None)
