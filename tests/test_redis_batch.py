"""One round trip for several modules' commands (aimesh_tasks/redis_batch.py), on real Redis."""

from __future__ import annotations

import os

import pytest
import redis
from redis.exceptions import ResponseError

from aimesh_tasks import redis_batch
from aimesh_tasks.redis_batch import Batch
from aimesh_tasks.redis_client import get_redis
from aimesh_tasks.settings import get_settings
from tests.redis_trips import round_trips
from tests.waits import wait_until

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


# --- deferred writes ----------------------------------------------------------------------

@pytest.fixture
def deferred(monkeypatch: pytest.MonkeyPatch) -> redis_batch._Deferred:
    """This test's own deferred writes, whose flusher waits an hour (so that only a batch,
    or a flush the test makes, can send them)."""
    monkeypatch.setattr(redis_batch, "FLUSH_AFTER_S", 3600)
    fresh = redis_batch._Deferred()
    monkeypatch.setattr(redis_batch, "_deferred", fresh)
    return fresh


def test_a_deferred_write_rides_the_next_batch(clean: None, deferred: redis_batch._Deferred,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    client = get_redis()
    client.delete("batch-test:marks")
    client.set("batch-test:string", "x")
    redis_batch.defer("SADD", "batch-test:marks", "m1")
    redis_batch.defer("LPUSH", "batch-test:string", "y")  # fails: dropped, not raised
    assert client.smembers("batch-test:marks") == set(), "not sent before a batch goes"
    sent = round_trips(monkeypatch)

    batch = Batch()
    got = batch.get("batch-test:string")
    batch.send()

    assert len(sent) == 1, "the deferred writes went with the batch, in its round trip"
    assert batch[got] == "x"  # the batch's own replies, by its own indexes
    assert client.smembers("batch-test:marks") == {"m1"}
    assert deferred.take() == []
    before = len(sent)
    Batch().send()
    assert len(sent) == before, "nothing deferred, nothing queued: no round trip"


def test_a_deferred_write_for_another_redis_waits_for_its_own(
        clean: None, deferred: redis_batch._Deferred) -> None:
    client = get_redis()
    other = redis.Redis.from_url(get_settings().redis_url, decode_responses=True)
    client.delete("batch-test:marks")
    redis_batch.defer("SADD", "batch-test:marks", "other", client=other)
    Batch().send()  # the default client's batch does not carry another client's writes
    assert client.smembers("batch-test:marks") == set()
    redis_batch.flush_deferred()
    assert client.smembers("batch-test:marks") == {"other"}


def test_with_no_batch_the_flusher_sends_a_deferred_write(
        clean: None, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(redis_batch, "_deferred", redis_batch._Deferred())
    client = get_redis()
    client.delete("batch-test:marks")
    redis_batch.defer("SADD", "batch-test:marks", "alone")
    wait_until(lambda: client.smembers("batch-test:marks") == {"alone"},
               "the flusher to send the deferred write", 30)


def test_a_forked_child_does_not_send_its_parents_deferred_writes(
        clean: None, deferred: redis_batch._Deferred) -> None:
    redis_batch.defer("SADD", "batch-test:marks", "parent's")
    pid = os.fork()
    if pid == 0:  # the child: its own, empty, deferred writes
        os._exit(0 if redis_batch._deferred.take() == [] else 1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, "the child inherited the parent's writes"
    assert [len(commands) for _, commands in deferred.take()] == [1], "the parent keeps them"
