"""The one-script result store (aimesh_tasks/result_backend.py) on a real Redis: it keeps
Celery's rule (a SUCCESS is never overwritten), its key, expiry and publish, and stores
what Celery's own RedisBackend would, in one round trip instead of two."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from celery import states
from celery.backends.redis import RedisBackend

from aimesh_tasks.result_backend import StoreOnceRedisBackend
from tests.conftest import BROKER_DB, REDIS
from tests.redis_trips import round_trips
from tests.waits import wait_until


@pytest.fixture()
def client(servers: None) -> Iterator[redis.Redis]:
    connection = redis.Redis.from_url(f"{REDIS}/{BROKER_DB}")
    yield connection
    for key in connection.scan_iter("celery-task-meta-rb-*"):
        connection.delete(key)


def _backend(app: Any, cls: type[RedisBackend]) -> RedisBackend:
    return cls(app=app, url=f"{REDIS}/{BROKER_DB}")


def _stored(client: redis.Redis, task_id: str) -> dict[str, Any]:
    raw = client.get(f"celery-task-meta-{task_id}")
    assert raw is not None, f"no result stored for {task_id}"
    meta: dict[str, Any] = json.loads(raw)
    meta.pop("date_done")
    return meta


def test_the_app_uses_it_for_a_redis_result_backend() -> None:
    from aimesh_tasks.app import app

    assert isinstance(app.backend, StoreOnceRedisBackend)


def test_it_stores_what_celery_stores_and_never_overwrites_a_success(
    client: redis.Redis,
) -> None:
    from aimesh_tasks.app import app

    ours, celerys = _backend(app, StoreOnceRedisBackend), _backend(app, RedisBackend)
    for backend, task_id in ((ours, "rb-ours"), (celerys, "rb-celery")):
        backend.store_result(task_id, {"text": "partial"}, states.STARTED)
        backend.store_result(task_id, {"text": "the answer"}, states.SUCCESS)
        backend.store_result(task_id, ValueError("a late copy failed"), states.FAILURE)
        backend.store_result(task_id, {"text": "a late copy"}, states.SUCCESS)
    assert _stored(client, "rb-ours") == {**_stored(client, "rb-celery"), "task_id": "rb-ours"}
    assert _stored(client, "rb-ours")["result"] == {"text": "the answer"}
    for backend, task_id in ((ours, "rb-ours-f"), (celerys, "rb-celery-f")):
        backend.store_result(task_id, ValueError("it failed"), states.FAILURE)
        backend.store_result(task_id, {"text": "the retry answered"}, states.SUCCESS)
    assert _stored(client, "rb-ours-f") == {**_stored(client, "rb-celery-f"),
                                            "task_id": "rb-ours-f"}
    assert _stored(client, "rb-ours-f")["status"] == states.SUCCESS


def test_expiry_follows_the_state_and_the_result_is_published(client: redis.Redis) -> None:
    from aimesh_tasks.app import app

    backend = _backend(app, StoreOnceRedisBackend)
    subscriber = client.pubsub()
    subscriber.subscribe("celery-task-meta-rb-pub")
    wait_until(lambda: (m := subscriber.get_message(timeout=0.1)) and m["type"] == "subscribe",
               "the subscription confirmed")
    backend.store_result("rb-pub", {"text": "hi"}, states.SUCCESS)
    message = wait_until(lambda: subscriber.get_message(timeout=0.1), "the published result")
    assert json.loads(message["data"])["result"] == {"text": "hi"}
    subscriber.close()
    assert client.ttl("celery-task-meta-rb-pub") == pytest.approx(backend.expires, abs=5)
    backend.store_result("rb-failed", ValueError("no"), states.FAILURE)
    assert client.ttl("celery-task-meta-rb-failed") == pytest.approx(backend.failure_expires,
                                                                     abs=5)


def test_one_round_trip_where_celery_takes_two(client: redis.Redis,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    from aimesh_tasks.app import app

    ours, celerys = _backend(app, StoreOnceRedisBackend), _backend(app, RedisBackend)
    ours.store_result("rb-warm", {"text": "x"}, states.SUCCESS)  # the script loaded once
    celerys.store_result("rb-warm-celery", {"text": "x"}, states.SUCCESS)
    sent = round_trips(monkeypatch)
    ours.store_result("rb-count-ours", {"text": "x"}, states.SUCCESS)
    mine = len(sent)
    celerys.store_result("rb-count-celery", {"text": "x"}, states.SUCCESS)
    assert (mine, len(sent) - mine) == (1, 2)
