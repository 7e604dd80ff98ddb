"""A bad envelope never kills a consumer; poison tasks are capped; workers exit with
Celery's status.

Raw bytes are pushed onto the real Redis lists of `aimesh.route` and an endpoint queue,
consumed by real worker subprocesses (a prefork router, a threads endpoint worker, both
serving /metrics); the dead-letter store, the producers' results, the metric and the logs
are read back. A poison task (a module written for the test, imported by its worker with
`-I`) calls `os._exit(1)` on every delivery. Pure checks of the envelope and argument
rules come first and need no server.
"""

from __future__ import annotations

import base64
import json
import os
import pickle
import subprocess
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from celery.result import AsyncResult

from aimesh_tasks import keys, submit
from aimesh_tasks.delivery import dead_letters
from aimesh_tasks.delivery.arguments import argument_problem, body_problem, header_problem
from aimesh_tasks.delivery.envelope import BadEnvelope, check_envelope, decode_envelope
from aimesh_tasks.errors import UndeliverableMessage
from aimesh_tasks.messages import parse_message
from aimesh_tasks.registry import Endpoint
from aimesh_tasks.simulator import RunningSimulator
from aimesh_tasks.tasks import call_endpoint, route_message
from tests.conftest import BROKER_DB, REDIS
from tests.observability_parts import free_port, only_these_workers, samples
from tests.processes import AIMESH, ROOT, WorkerProcess, start_workers
from tests.waits import wait_until

Sim = Callable[..., RunningSimulator]
MakeEndpoint = Callable[..., Endpoint]
CANARY = f"dl-canary-{uuid.uuid4().hex}"
EMBED = {"callbacks": None, "errbacks": None, "chain": None, "chord": None}
METRIC = "aimesh_dead_letters_total"


# --- pure rules ---------------------------------------------------------------------------


def test_key_formats() -> None:
    assert keys.dead_letters("aimesh.route") == "aimesh:dead:queue:aimesh.route"
    assert keys.dead_letter_queues() == "aimesh:dead:queues"
    assert keys.deliveries("m1") == "aimesh:deliveries:m1"
    assert keys.delivery_history("m1") == "aimesh:deliveries:m1:history"


@pytest.mark.parametrize(("raw", "reason", "needle"), [
    (b'{"broken": ', "invalid_json", "JSONDecodeError"),
    (b"\xff\xfe not utf-8", "invalid_json", "UnicodeDecodeError"),
    (b"[" * 100_000 + b"]" * 100_000, "invalid_json", "RecursionError"),
])
def test_bytes_that_are_not_json_are_named(raw: bytes, reason: str, needle: str) -> None:
    with pytest.raises(BadEnvelope) as caught:
        decode_envelope(raw)
    assert caught.value.reason == reason and needle in caught.value.detail


def _envelope(**changes: Any) -> dict[str, Any]:
    good: dict[str, Any] = {
        "body": "e30=", "content-type": "application/json", "headers": {"task": "t"},
        "properties": {"delivery_tag": "tag", "body_encoding": "base64",
                       "delivery_info": {"exchange": "q", "routing_key": "q"}}}
    return {**good, **changes}


@pytest.mark.parametrize(("payload", "needle"), [
    ({"hello": "world"}, "'properties'"),
    ([1, 2], "JSON list"),
    (_envelope(properties={"delivery_tag": "t", "delivery_info": {"exchange": "q"}}),
     "'routing_key'"),
    (_envelope(properties={"delivery_info": {"exchange": "q", "routing_key": "q"}}),
     "delivery_tag"),
    (_envelope(headers=["task"]), "'headers'"),
    (_envelope(body=42), "'body'"),
])
def test_json_that_is_not_an_envelope_is_named(payload: Any, needle: str) -> None:
    with pytest.raises(BadEnvelope) as caught:
        check_envelope(payload)
    assert caught.value.reason == "not_an_envelope" and needle in caught.value.detail


def test_a_good_envelope_passes() -> None:
    check_envelope(_envelope())


def test_arguments_must_fit_the_task_signature_and_json_types() -> None:
    message = {"id": "m", "agent_id": "a"}
    assert argument_problem(route_message.run, [message], {}) is None
    assert argument_problem(route_message.run, [message], {"errors_as_results": True}) is None
    assert argument_problem(route_message.run, [42], {}) == (
        "argument 'message' must be an object, got int")
    # The call task takes one envelope (or, from a wave-1 router, message, route, ...).
    assert argument_problem(call_endpoint.run, [42], {}) == (
        "argument 'envelope' must be an object, got int")
    assert argument_problem(call_endpoint.run, [], {}) is not None
    assert argument_problem(call_endpoint.run, [message, [], None, None, True], {}) is None
    assert argument_problem(call_endpoint.run, [message, [], None, None, 1], {}) == (
        "argument 'metered' must be a boolean, got int")
    assert argument_problem(call_endpoint.run, [message, [], "x"], {}) == (
        "argument 'attempts' must be a list or null, got str")
    assert argument_problem(route_message.run, {"a": 1}, {}) is not None


def test_bodies_and_headers_the_main_process_reads_are_checked() -> None:
    assert body_problem([[], {}, None]) is None and body_problem({"args": []}) is None
    assert body_problem(42) == ("a task message's body must be [args, kwargs, embed], not a "
                                "JSON int")
    assert "list of 2" in str(body_problem([[], {}]))
    assert body_problem([{}, {}, {}]) == "a task message's body must be [list, object, " \
                                         "object or null]"
    assert header_problem({}) is None
    assert header_problem({"timelimit": [None, 90], "retries": 2}) is None
    assert "'timelimit'" in str(header_problem({"timelimit": "xx"}))
    assert "'timelimit'" in str(header_problem({"timelimit": [True, 1]}))
    assert "'retries'" in str(header_problem({"retries": "3"}))


# --- raw bytes on real queues, real workers -----------------------------------------------


def _raw_envelope(queue: str, body: bytes, headers: dict[str, Any],
                  content_type: str = "application/json") -> bytes:
    """A message envelope as kombu's Redis transport writes it."""
    return json.dumps({
        "body": base64.b64encode(body).decode(), "content-encoding": "utf-8",
        "content-type": content_type, "headers": headers,
        "properties": {"correlation_id": headers.get("id"), "delivery_mode": 2,
                       "delivery_info": {"exchange": queue, "routing_key": queue},
                       "priority": 0, "body_encoding": "base64",
                       "delivery_tag": str(uuid.uuid4())}}).encode()


def _task(queue: str, task: str, args: list[Any], task_id: str) -> bytes:
    headers = {"lang": "py", "task": task, "id": task_id, "argsrepr": "", "kwargsrepr": ""}
    return _raw_envelope(queue, json.dumps([args, {}, EMBED]).encode(), headers)


def _cases(queue: str, task: str) -> list[tuple[str, bytes, str | None]]:
    """(expected reason, bytes to push, task id a producer could wait on) for one queue."""
    tid = f"dl-{uuid.uuid4().hex[:8]}"
    headers = {"lang": "py", "task": task, "argsrepr": "", "kwargsrepr": ""}
    timed = {**headers, "id": f"{tid}-limits", "timelimit": "xx"}
    deep = b"[" * 100_000 + b"]" * 100_000
    return [
        ("invalid_json", f'{{"note": "{CANARY}", oops'.encode(), None),
        ("not_an_envelope", json.dumps({"hello": CANARY}).encode(), None),
        ("not_a_task", _raw_envelope(queue, json.dumps({"x": CANARY}).encode(),
                                     {"note": CANARY}), None),
        ("unknown_task", _task(queue, "no.such.task", [CANARY], f"{tid}-unknown"),
         f"{tid}-unknown"),
        ("content_type", _raw_envelope(queue, pickle.dumps([[CANARY], {}, EMBED]),
                                       {**headers, "id": f"{tid}-pickle"},
                                       "application/x-python-serialize"), f"{tid}-pickle"),
        ("undecodable_body", _raw_envelope(queue, deep, {**headers, "id": f"{tid}-deep"}),
         f"{tid}-deep"),
        ("bad_arguments", _task(queue, task, [42], f"{tid}-args"), f"{tid}-args"),
        ("invalid_task", _raw_envelope(queue, b"42", {**headers, "id": f"{tid}-int"}),
         f"{tid}-int"),
        ("invalid_task", _raw_envelope(queue, json.dumps([[CANARY], {}, EMBED]).encode(),
                                       timed), f"{tid}-limits"),
    ]


@pytest.fixture(scope="module")
def guarded(database: str, tmp_path_factory: pytest.TempPathFactory
            ) -> Iterator[list[tuple[WorkerProcess, int]]]:
    """A prefork router worker and a threads endpoint worker following the registry, each
    serving /metrics: (worker, port)."""
    tmp = tmp_path_factory.mktemp("dead-letter-metrics")
    started: list[tuple[WorkerProcess, int]] = []
    for name, args in ((f"dl-router-{uuid.uuid4().hex[:6]}",
                        ["--router", "-P", "prefork", "-c", "2"]),
                       (f"dl-endpoints-{uuid.uuid4().hex[:6]}",
                        ["--endpoints", "all", "-P", "threads", "-c", "4"])):
        port = free_port()
        env = {"AIMESH_WORKER_METRICS_PORT": str(port),
               "PROMETHEUS_MULTIPROC_DIR": str(tmp / name)}
        started += [(w, port) for w in start_workers([(name, args)], env)]
    yield started
    for worker, _ in started:
        worker.stop()


def _dead_counts(ports: list[int]) -> dict[tuple[str, str], float]:
    counts: dict[tuple[str, str], float] = {}
    for port in ports:
        for (name, labels), count in samples(f"http://127.0.0.1:{port}/metrics").items():
            if name == METRIC:
                key = (dict(labels)["queue"], dict(labels)["reason"])
                counts[key] = counts.get(key, 0.0) + count
    return counts


def test_bad_messages_are_dead_lettered_and_the_workers_keep_consuming(
    guarded: list[tuple[WorkerProcess, int]], simulator: Sim, endpoint: MakeEndpoint
) -> None:
    only = endpoint(simulator(), "dead-letters")
    mine = {worker.hostname for worker, _ in guarded}
    broker = redis.Redis.from_url(f"{REDIS}/{BROKER_DB}")
    pushed = {keys.ROUTE_QUEUE: _cases(keys.ROUTE_QUEUE, "aimesh.route"),
              only.queue: _cases(only.queue, "aimesh.call")}
    with only_these_workers(mine, [only.queue]):
        before = _dead_counts([port for _, port in guarded])
        log_start = {worker.name: len(worker.log.read_text()) for worker, _ in guarded}
        for queue, cases in pushed.items():
            for _, raw, _ in cases:
                broker.lpush(queue, raw)
        expected = sum(len(cases) for cases in pushed.values())
        entries = wait_until(
            lambda: found if len(found := dead_letters.list_entries(limit=1000)) >= expected
            else None, f"{expected} dead letters", seen=dead_letters.list_entries)
        # The workers are alive and a normal message still goes through both queues.
        answer = submit(agent_id="after-dead-letters", prompt="still there?",
                        max_tokens=16).get(timeout=60)
        after = _dead_counts([port for _, port in guarded])

    assert answer["endpoint_id"] == only.id and answer["text"]
    assert all(worker.proc.poll() is None for worker, _ in guarded)
    assert broker.llen(keys.ROUTE_QUEUE) == 0 and broker.llen(only.queue) == 0
    ids = [tid.encode() for cases in pushed.values() for _, _, tid in cases if tid]
    assert not [v for v in broker.hvals("unacked")  # every bad message was acked
                if CANARY.encode() in v or any(tid in v for tid in ids)]

    stored = {(e["queue"], e["raw"]): e for e in entries}
    for queue, cases in pushed.items():
        for reason, raw, task_id in cases:
            entry = stored[(queue, raw[:dead_letters.RAW_LIMIT_BYTES])]
            assert (entry["reason"], entry["task_id"]) == (reason, task_id)
            assert entry["size"] == len(raw)
            assert entry["raw"] == raw[:dead_letters.RAW_LIMIT_BYTES]
            assert dead_letters.is_truncated(entry) == (len(raw) > dead_letters.RAW_LIMIT_BYTES)
            assert entry["pid"] in {worker.proc.pid for worker, _ in guarded}
            if task_id is not None:
                with pytest.raises(UndeliverableMessage) as caught:
                    AsyncResult(task_id).get(timeout=30)
                assert caught.value.reason == reason and caught.value.queue == queue
                assert caught.value.dead_letter_id == entry["id"]
    assert len(entries) == expected

    for queue, cases in pushed.items():
        for reason in {reason for reason, _, _ in cases}:
            grew = after.get((queue, reason), 0) - before.get((queue, reason), 0)
            assert grew == sum(r == reason for r, _, _ in cases), (queue, reason, after)
    logs = "".join(worker.log.read_text()[log_start[worker.name]:] for worker, _ in guarded)
    assert logs.count('"message.dead_lettered"') == expected
    assert CANARY not in logs  # no payload text in any log line
    assert "Unrecoverable error" not in logs


POISON_MODULE = '''
import os

from aimesh_tasks.app import app


@app.task(name="test.poison")
def poison(runs_file: str) -> None:
    """Note the run, then take the worker process down with it."""
    with open(runs_file, "a") as runs:
        runs.write("run\\n")
    os._exit(1)
'''


@pytest.fixture()
def poison_worker(clean: None, tmp_path: Path) -> Iterator[WorkerProcess]:
    """A prefork worker on its own queue that imports the poison task, capped at 3."""
    (tmp_path / "dl_poison.py").write_text(POISON_MODULE)
    env = {"PYTHONPATH": os.pathsep.join([str(tmp_path), str(ROOT)]),
           "AIMESH_MAX_DELIVERIES": "3"}
    [worker] = start_workers([(f"dl-poison-{uuid.uuid4().hex[:6]}",
                               ["celery", "-Q", "dl.poison", "-P", "prefork", "-c", "1",
                                "-I", "dl_poison"])], env)
    yield worker
    worker.stop()


def test_a_task_that_kills_its_worker_is_dead_lettered_after_max_deliveries(
    poison_worker: WorkerProcess, tmp_path: Path
) -> None:
    runs = tmp_path / "runs"
    task_id = f"poison-{uuid.uuid4().hex[:8]}"
    from aimesh_tasks.app import app

    result = app.send_task("test.poison", (str(runs),), queue="dl.poison", task_id=task_id)
    with pytest.raises(UndeliverableMessage) as caught:
        result.get(timeout=90)
    assert caught.value.reason == "max_deliveries"
    [entry] = dead_letters.list_entries("dl.poison")
    assert entry["id"] == caught.value.dead_letter_id and entry["task_id"] == task_id
    assert entry["task"] == "test.poison" and "delivered 4 times" in entry["detail"]
    assert runs.read_text().splitlines() == ["run"] * 3  # run 3 times, not a 4th
    assert len(entry["history"]) == 3
    assert all("exitcode 1" in h["error"] for h in entry["history"])
    assert {h["worker"] for h in entry["history"]} == {poison_worker.hostname}
    assert poison_worker.proc.poll() is None


# --- `aimesh dead` as a subprocess ----------------------------------------------------------


def aimesh(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([AIMESH, "dead", *args], capture_output=True, text=True, cwd=ROOT,
                          timeout=60)


def test_aimesh_dead_lists_shows_requeues_and_purges(
    guarded: list[tuple[WorkerProcess, int]], simulator: Sim, endpoint: MakeEndpoint
) -> None:
    only = endpoint(simulator(), "requeue")
    message = parse_message({"agent_id": "requeued", "prompt": "back again", "max_tokens": 16})
    good = _task(keys.ROUTE_QUEUE, "aimesh.route", [message.to_json_dict()], message.id)
    kept = dead_letters.add(keys.ROUTE_QUEUE, good, "unknown_task", "deployed since",
                            task_id=message.id, task="aimesh.route")
    junk = dead_letters.add(only.queue, b"x" * (dead_letters.RAW_LIMIT_BYTES + 1),
                            "invalid_json", "too big")

    listed = [json.loads(line) for line in aimesh("list", "--json").stdout.splitlines()]
    assert [e["id"] for e in listed] == [junk["id"], kept["id"]]
    assert "raw_b64" not in listed[0] and listed[0]["truncated"] is True
    shown = json.loads(aimesh("show", message.id).stdout)  # by task id
    assert shown["id"] == kept["id"] and base64.b64decode(shown["raw_b64"]) == good

    # Ids are per queue (Redis stream ids): two letters added within one millisecond on two
    # queues share one, so the commands are told the queue.
    refused = aimesh("requeue", junk["id"], "--queue", only.queue)
    assert refused.returncode == 2 and "cannot be requeued" in refused.stderr
    done = aimesh("requeue", kept["id"], "--queue", keys.ROUTE_QUEUE)
    assert done.returncode == 0 and f"onto {keys.ROUTE_QUEUE}" in done.stdout
    assert AsyncResult(message.id).get(timeout=60)["endpoint_id"] == only.id
    assert [e["id"] for e in dead_letters.list_entries()] == [junk["id"]]

    assert aimesh("purge", "--yes").stdout.strip() == "deleted 1 dead letter"
    assert dead_letters.list_entries() == [] and "no dead letters" in aimesh("list").stdout
    missing = aimesh("show", "nope")
    assert missing.returncode == 2 and missing.stderr.startswith("error: no dead letter")


# --- the worker's exit status ---------------------------------------------------------------


def test_a_worker_that_stops_on_an_error_exits_non_zero(servers: None) -> None:
    """A broker nobody listens on, with retries at start-up off: Celery stops the worker
    with status 1, and `aimesh worker` must pass it on (it used to exit 0)."""
    env = {**os.environ, "AIMESH_BROKER_URL": f"redis://127.0.0.1:{free_port()}/0"}
    stopped = subprocess.run(
        [AIMESH, "worker", "--router", "-P", "solo", "--",
         "broker_connection_retry_on_startup=false"],
        env=env, capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert stopped.returncode == 1, stopped.stdout[-2000:] + stopped.stderr[-2000:]
    assert "Shutting down" in stopped.stdout + stopped.stderr
