"""The Redis transport's unacked records (delivery/transport.py), on a real Redis: a
delivered message is recorded in the `unacked` hash and index; an ack removes the record
with the next delivery's script, or when the acks wait ACK_FLUSH_S, or when the channel
closes, and never gives an acked message back to its queue."""

from __future__ import annotations

import base64
import json
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from kombu import Connection

from aimesh_tasks.delivery.transport import GuardedTransport
from tests.conftest import BROKER_DB, REDIS

URL = f"{REDIS}/{BROKER_DB}"


@pytest.fixture()
def queue() -> Iterator[str]:
    name = f"transport-test-{uuid.uuid4().hex[:8]}"
    yield name
    redis.Redis.from_url(URL).delete(name)


@pytest.fixture()
def connection() -> Iterator[Any]:
    with Connection(URL, transport=GuardedTransport) as opened:
        yield opened


def _channel_with(connection: Any, queue: str, messages: int) -> Any:
    """A channel of `connection`, `messages` messages ({"n": 0}, ...) published to `queue`;
    `tags_seen` collects the delivery tags it takes."""
    channel = connection.channel()
    channel.tags_seen = set()
    producer = connection.Producer(channel)
    for n in range(messages):
        producer.publish({"n": n}, routing_key=queue, declare=[], serializer="json")
    return channel


def _take(channel: Any, queue: str) -> Any:
    message = channel.basic_get(queue, no_ack=False)
    assert message is not None, f"nothing on {queue}"
    channel.tags_seen.add(str(message.delivery_tag))
    return message


def _records(channel: Any) -> set[str]:
    """Of the tags this test took, those still recorded as unacked in Redis."""
    client = redis.Redis.from_url(URL)
    recorded = {t.decode() for t in client.hkeys(channel.qos.unacked_key)}
    indexed = {t.decode() for t in client.zrange(channel.qos.unacked_index_key, 0, -1)}
    assert recorded & channel.tags_seen == indexed & channel.tags_seen, "hash and index agree"
    return recorded & channel.tags_seen


def test_acks_ride_the_next_delivery_or_go_when_due_and_none_is_given_back(
        connection: Any, queue: str) -> None:
    channel = _channel_with(connection, queue, 3)
    first = _take(channel, queue)
    assert _records(channel) == {str(first.delivery_tag)}
    first.ack()  # waits for the next script
    assert _records(channel) == {str(first.delivery_tag)}
    second = _take(channel, queue)  # its record carries the first's removal
    assert _records(channel) == {str(second.delivery_tag)}
    second.ack()
    channel.qos.flush_acked(older_than_s=3600)  # not due: nothing sent
    assert _records(channel) == {str(second.delivery_tag)}
    channel.qos.flush_acked(older_than_s=0)
    assert _records(channel) == set()
    third = _take(channel, queue)
    third.ack()
    assert _records(channel) == {str(third.delivery_tag)}
    channel.close()  # the close removes what was acked, and gives nothing back
    assert redis.Redis.from_url(URL).llen(queue) == 0
    client = redis.Redis.from_url(URL)
    assert str(third.delivery_tag).encode() not in client.hkeys(channel.qos.unacked_key)


def test_an_unacked_message_is_still_given_back_when_its_channel_closes(
        connection: Any, queue: str) -> None:
    channel = _channel_with(connection, queue, 2)
    _take(channel, queue)  # never acked
    _take(channel, queue).ack()
    channel.close()
    client = redis.Redis.from_url(URL)
    [back] = client.lrange(queue, 0, -1)  # the unacked one is back, and only it
    payload = json.loads(back)
    body = payload["body"]
    if payload["properties"].get("body_encoding") == "base64":
        body = base64.b64decode(body)
    assert json.loads(body) == {"n": 0}
    assert _records(channel) == set()


def test_acks_a_lost_connection_kept_are_removed_by_the_next_channel(
        connection: Any, queue: str, monkeypatch: pytest.MonkeyPatch) -> None:
    channel = _channel_with(connection, queue, 1)
    taken = _take(channel, queue)
    taken.ack()

    def unreachable(source: str) -> Any:
        raise redis.ConnectionError("Redis went away")

    monkeypatch.setattr(channel.qos, "_script", unreachable)
    channel.qos.restore_unacked()  # what kombu calls as the connection is lost
    assert _records(channel) == {str(taken.delivery_tag)}  # kept in Redis for now
    monkeypatch.undo()

    after = connection.channel()  # the channel of the reconnected worker
    after.tags_seen = channel.tags_seen
    after.basic_consume(queue, False, lambda message: None, "after")
    after.qos.flush_acked()
    assert _records(after) == set()
    assert redis.Redis.from_url(URL).llen(queue) == 0  # and nothing was given back
    after.close()
