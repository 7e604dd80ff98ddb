"""RabbitMQ as the broker: the queue rules (pure), then, in the RabbitMQ session
(AIMESH_TEST_BROKER=rabbitmq, see tests/conftest.py), what the broker itself holds:
quorum task queues with a delivery limit and the aimesh.dead exchange, publisher confirms
that turn a refused publish into an error, a poison task dead-lettered by the broker
after AIMESH_MAX_DELIVERIES runs and drained into `aimesh dead`, and invalid bytes on the
route queue dead-lettered while the workers keep consuming.

The queues are read back with `rabbitmqctl list_queues` in this slot's vhost; the poison
task (a module written for the test, imported by its worker with `-I`) calls `os._exit(1)`
while a file says it is armed.
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from amqp.exceptions import MessageNacked
from celery.result import AsyncResult
from kombu.connection import Connection

from aimesh_tasks import keys, submit
from aimesh_tasks.delivery import dead_letters
from aimesh_tasks.errors import ConfigError, UndeliverableMessage
from aimesh_tasks.rabbit.drain import dead_queue, death_of
from aimesh_tasks.rabbit.queues import delivery_limit, priorities_applied, queue_arguments
from aimesh_tasks.registry import Endpoint
from aimesh_tasks.settings import get_settings, load_settings
from aimesh_tasks.simulator import RunningSimulator
from tests.conftest import BROKER_URL, MATRIX_VHOST, RABBITMQ
from tests.processes import ROOT, WorkerProcess, start_workers
from tests.waits import wait_until

Sim = Callable[..., RunningSimulator]
MakeEndpoint = Callable[..., Endpoint]


# --- pure rules ---------------------------------------------------------------------------


def test_quorum_queues_get_a_delivery_limit_one_below_the_runs_allowed() -> None:
    assert queue_arguments("quorum", 5) == {
        "x-queue-type": "quorum", "x-delivery-limit": 4,
        "x-dead-letter-exchange": "aimesh.dead", "x-dead-letter-strategy": "at-least-once",
        "x-overflow": "reject-publish"}
    assert [delivery_limit(n) for n in (1, 2, 5)] == [0, 1, 4]
    with pytest.raises(ValueError, match="max_deliveries"):
        delivery_limit(0)


def test_classic_queues_keep_priorities_and_nothing_else() -> None:
    assert queue_arguments("classic", 5) == {"x-max-priority": 9}
    with pytest.raises(ValueError, match="queue_type"):
        queue_arguments("stream", 5)


def test_priorities_are_applied_by_classic_queues_and_by_quorum_ones_from_4_0() -> None:
    assert priorities_applied("classic", "3.10.8")
    assert not priorities_applied("quorum", "3.10.8")
    assert not priorities_applied("quorum", "")
    assert priorities_applied("quorum", "4.0.2")


def test_an_unknown_queue_type_names_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AIMESH_RABBIT_QUEUE_TYPE", "fifo")
    with pytest.raises(ConfigError, match="AIMESH_RABBIT_QUEUE_TYPE"):
        load_settings()


def test_the_death_headers_name_the_source_queue_and_reason() -> None:
    headers = {"x-first-death-queue": "aimesh.route", "x-first-death-reason": "delivery_limit",
               "x-death": [{"queue": "aimesh.route", "reason": "delivery_limit", "count": 1}]}
    assert death_of(headers) == ("aimesh.route", "delivery_limit")
    assert death_of({"x-death": [{"queue": "q.1", "reason": "rejected"}]}) == ("q.1", "rejected")
    assert death_of({"x-first-death-queue": "bad name\n{}"}) == ("_other", "unknown")
    assert death_of({}) == ("_other", "unknown")


# --- on RabbitMQ --------------------------------------------------------------------------


def _queues() -> dict[str, dict[str, Any]]:
    done = subprocess.run(["rabbitmqctl", "list_queues", "-p", MATRIX_VHOST, "name", "type",
                           "arguments", "messages", "--formatter", "json"],
                          capture_output=True, text=True, timeout=120, check=True)
    return {q["name"]: {**q, "arguments": {a[0]: a[2] for a in q["arguments"]}}
            for q in json.loads(done.stdout)}


@pytest.mark.rabbitmq
@pytest.mark.usefixtures("workers")
def test_task_queues_are_quorum_queues_that_dead_letter_to_aimesh_dead(
    simulator: Sim, endpoint: MakeEndpoint
) -> None:
    only = endpoint(simulator(), "quorum")
    assert submit(agent_id="quorum-agent", prompt="hello", max_tokens=16).get(timeout=60)["text"]
    queues = _queues()
    limit = get_settings().max_deliveries - 1
    for name in (keys.ROUTE_QUEUE, only.queue):
        assert queues[name]["type"] == "quorum", queues[name]
        assert queues[name]["arguments"] == {
            "x-queue-type": "quorum", "x-delivery-limit": limit,
            "x-dead-letter-exchange": keys.DEAD_EXCHANGE,
            "x-dead-letter-strategy": "at-least-once", "x-overflow": "reject-publish"}
    assert queues[keys.DEAD_QUEUE]["type"] == "quorum"


@pytest.fixture()
def classic_vhost() -> Iterator[str]:
    """A vhost of its own whose route queue was made classic, as by an earlier release or
    another tool (a queue cannot change type: RabbitMQ refuses a declaration that differs)."""
    vhost = f"aimesh_mismatch_{uuid.uuid4().hex[:6]}"
    for args in (["add_vhost", vhost], ["set_permissions", "-p", vhost, "guest", ".*", ".*",
                                         ".*"]):
        subprocess.run(["rabbitmqctl", *args], capture_output=True, timeout=120, check=True)
    url = f"{RABBITMQ}/{vhost}"
    with Connection(url) as connection:
        connection.default_channel.queue_declare(keys.ROUTE_QUEUE, durable=True,
                                                 auto_delete=False,
                                                 arguments={"x-max-priority": 9})
    yield url
    subprocess.run(["rabbitmqctl", "delete_vhost", vhost], capture_output=True, timeout=120)


@pytest.mark.rabbitmq
def test_a_queue_made_with_other_arguments_stops_worker_and_producer_with_a_clear_error(
    classic_vhost: str
) -> None:
    from tests.processes import AIMESH

    env = {**os.environ, "AIMESH_BROKER_URL": classic_vhost,
           "AIMESH_RABBIT_QUEUE_TYPE": "quorum"}
    worker = subprocess.run([AIMESH, "worker", "--router", "-P", "threads", "-c", "1"],
                            capture_output=True, text=True, cwd=ROOT, env=env, timeout=90)
    said = worker.stdout + worker.stderr
    assert worker.returncode == 2, said[-2000:]
    assert "Traceback" not in said and "Unrecoverable error" not in said, said[-2000:]
    assert f"queue '{keys.ROUTE_QUEUE}'" in said and "AIMESH_RABBIT_QUEUE_TYPE" in said
    assert "inequivalent arg" in said and "guest:**@" in said  # the broker's words, no password
    enqueue = subprocess.run([AIMESH, "enqueue", "hello"], capture_output=True, text=True,
                             cwd=ROOT, env=env, timeout=90)
    said = enqueue.stdout + enqueue.stderr
    assert enqueue.returncode == 2 and "Traceback" not in said, said[-2000:]
    assert f"queue '{keys.ROUTE_QUEUE}'" in said and "AIMESH_RABBIT_QUEUE_TYPE" in said
    # The type the queue has: the same worker starts (it is stopped once it is ready).
    classic = subprocess.Popen([AIMESH, "worker", "--router", "-P", "threads", "-c", "1",
                                "-l", "INFO"],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               cwd=ROOT, env={**env, "AIMESH_RABBIT_QUEUE_TYPE": "classic"},
                               start_new_session=True)
    try:
        assert classic.stdout is not None
        lines = []
        for line in classic.stdout:
            lines.append(line)
            if " ready." in line:
                break
        assert any(" ready." in line for line in lines), "".join(lines)[-2000:]
    finally:
        os.killpg(classic.pid, 15)
        classic.wait(60)
        if classic.stdout is not None:
            classic.stdout.close()


def _depth(queue: str) -> int:
    with Connection(BROKER_URL) as connection:
        return int(connection.default_channel.queue_declare(queue, passive=True).message_count)


@pytest.fixture()
def full_queue() -> Iterator[str]:
    """A queue that holds one message and refuses the next (a classic one: a quorum queue
    enforces its length only once past it)."""
    name = f"confirm.full-{uuid.uuid4().hex[:6]}"
    with Connection(BROKER_URL) as connection:
        connection.default_channel.queue_declare(
            name, durable=True, auto_delete=False,
            arguments={"x-max-length": 1, "x-overflow": "reject-publish"})
        yield name
        connection.default_channel.queue_delete(name)


@pytest.mark.rabbitmq
def test_a_publish_the_broker_refuses_raises_instead_of_vanishing(
    servers: None, full_queue: str
) -> None:
    from aimesh_tasks.app import app

    def publish(producer: Any) -> None:
        producer.publish(b"{}", exchange="", routing_key=full_queue,
                         content_type="application/json", retry=False)

    with app.producer_or_acquire() as producer:  # the connections tasks and submit() use
        publish(producer)
        with pytest.raises(MessageNacked):
            publish(producer)
    # Without confirms the same publish returns as if it had worked: what confirms are for.
    with Connection(BROKER_URL) as unconfirmed:
        publish(unconfirmed.Producer())
    assert _depth(full_queue) == 1


POISON_MODULE = '''
import os

from aimesh_tasks.app import app


@app.task(name="test.rabbit_poison")
def poison(runs_file: str, armed_file: str) -> str:
    """Note the run; while armed, take the worker process down with it."""
    with open(runs_file, "a") as runs:
        runs.write("run\\n")
    if os.path.exists(armed_file):
        os._exit(1)
    return "fine"
'''


@pytest.fixture()
def poison_worker(clean: None, tmp_path: Path) -> Iterator[WorkerProcess]:
    """A prefork worker on its own quorum queue that imports the poison task."""
    (tmp_path / "rabbit_poison.py").write_text(POISON_MODULE)
    env = {"PYTHONPATH": os.pathsep.join([str(tmp_path), str(ROOT)])}
    [worker] = start_workers([(f"rq-poison-{uuid.uuid4().hex[:6]}",
                               ["celery", "-Q", "rq.poison", "-P", "prefork", "-c", "1",
                                "-I", "rabbit_poison"])], env)
    yield worker
    worker.stop()


def _aimesh_dead(*args: str) -> subprocess.CompletedProcess[str]:
    from tests.processes import AIMESH

    return subprocess.run([AIMESH, "dead", *args], capture_output=True, text=True, cwd=ROOT,
                          timeout=60)


@pytest.mark.rabbitmq
def test_a_task_that_kills_its_worker_goes_to_the_dead_letter_exchange_after_the_limit(
    poison_worker: WorkerProcess, tmp_path: Path
) -> None:
    from aimesh_tasks.app import app

    runs, armed = tmp_path / "runs", tmp_path / "armed"
    armed.touch()
    task_id = f"rq-poison-{uuid.uuid4().hex[:8]}"
    result = app.send_task("test.rabbit_poison", (str(runs), str(armed)), queue="rq.poison",
                           task_id=task_id)
    with pytest.raises(UndeliverableMessage) as caught:
        result.get(timeout=120)
    limit = get_settings().max_deliveries
    assert caught.value.reason == "max_deliveries" and caught.value.queue == "rq.poison"
    assert runs.read_text().splitlines() == ["run"] * limit  # the broker counted, not a 6th
    [entry] = dead_letters.list_entries("rq.poison")
    assert entry["id"] == caught.value.dead_letter_id and entry["task_id"] == task_id
    assert entry["task"] == "test.rabbit_poison" and f"delivered {limit} times" in entry["detail"]
    assert "x-delivery-limit" in entry["detail"]  # the broker dead-lettered it, not the worker
    assert len(entry["history"]) == limit
    assert all("exitcode 1" in h["error"] for h in entry["history"])
    assert json.loads(entry["raw"])["headers"]["id"] == task_id
    assert _depth("rq.poison") == 0 and _depth(keys.DEAD_QUEUE) == 0
    assert poison_worker.proc.poll() is None

    # The bug fixed, the dead letter replayed: the same task id runs once more and answers.
    armed.unlink()
    done = _aimesh_dead("requeue", task_id)
    assert done.returncode == 0, done.stderr
    assert AsyncResult(task_id).get(timeout=60) == "fine"
    assert runs.read_text().splitlines() == ["run"] * (limit + 1)
    assert dead_letters.list_entries("rq.poison") == []


def _take_and_give_back(queue: str) -> None:
    """Take the message at the head of `queue` and close the channel without an ack, as a
    worker holding it for its countdown does when it stops."""
    with Connection(BROKER_URL) as connection:
        channel = connection.channel()
        wait_until(lambda: channel.basic_get(queue, no_ack=False), f"a message on {queue}", 30)
        channel.close()


def test_a_message_dead_lettered_unrun_goes_back_a_few_times_only() -> None:
    from aimesh_tasks.delivery.deliveries import PUT_BACK_LIMIT, put_back_unrun

    assert put_back_unrun(runs=1, put_back=0, max_deliveries=5)
    assert put_back_unrun(runs=4, put_back=PUT_BACK_LIMIT - 1, max_deliveries=5)
    assert not put_back_unrun(runs=5, put_back=0, max_deliveries=5)  # it ran that often
    assert not put_back_unrun(runs=1, put_back=PUT_BACK_LIMIT, max_deliveries=5)


@pytest.mark.rabbitmq
def test_a_message_rabbitmq_dead_lettered_for_returns_no_worker_ran_is_put_back_and_runs(
    clean: None, tmp_path: Path
) -> None:
    """A quorum queue counts every return towards its delivery limit: a worker holding a
    message for its countdown gives it back unrun when it stops, and after
    AIMESH_MAX_DELIVERIES such returns the message is dead-lettered though it never ran.
    The drain finds no delivery of it screened, puts it back on its queue, and a worker runs
    it once, with no dead letter kept."""
    from aimesh_tasks.app import app
    from aimesh_tasks.delivery import deliveries
    from aimesh_tasks.rabbit.amqp import task_queue_arguments

    queue = f"rq.unrun-{uuid.uuid4().hex[:6]}"
    runs, armed = tmp_path / "runs", tmp_path / "armed"  # not armed: the task answers
    (tmp_path / "rabbit_poison.py").write_text(POISON_MODULE)
    task_id = f"rq-unrun-{uuid.uuid4().hex[:8]}"
    with Connection(BROKER_URL) as connection:
        dead_queue()(connection.default_channel).declare()  # as every worker does
        connection.default_channel.queue_declare(queue, durable=True, auto_delete=False,
                                                 arguments=task_queue_arguments())
    try:
        result = app.send_task("test.rabbit_poison", (str(runs), str(armed)), queue=queue,
                               task_id=task_id)
        for _ in range(get_settings().max_deliveries):
            _take_and_give_back(queue)
        env = {"PYTHONPATH": os.pathsep.join([str(tmp_path), str(ROOT)])}
        [worker] = start_workers([(f"rq-unrun-{uuid.uuid4().hex[:6]}",
                                   ["celery", "-Q", queue, "-P", "prefork", "-c", "1",
                                    "-I", "rabbit_poison"])], env)
        try:
            assert result.get(timeout=120) == "fine"
        finally:
            worker.stop()
        assert runs.read_text().splitlines() == ["run"]
        assert deliveries.put_back_so_far(task_id) == 1
        assert [e for e in dead_letters.list_entries() if e["task_id"] == task_id] == []
        assert _depth(queue) == 0 and _depth(keys.DEAD_QUEUE) == 0
    finally:
        with Connection(BROKER_URL) as connection:
            connection.default_channel.queue_delete(queue)


@pytest.mark.rabbitmq
@pytest.mark.usefixtures("workers")
def test_bytes_that_are_not_json_on_the_route_queue_are_dead_lettered_and_routing_goes_on(
    simulator: Sim, endpoint: MakeEndpoint
) -> None:
    only = endpoint(simulator(), "rq-bad-bytes")
    task_id = f"rq-bad-{uuid.uuid4().hex[:8]}"
    headers = {"lang": "py", "task": "aimesh.route", "id": task_id, "argsrepr": "",
               "kwargsrepr": ""}
    with Connection(BROKER_URL) as connection:
        connection.Producer().publish(b'{"broken": ', exchange="", routing_key=keys.ROUTE_QUEUE,
                                      content_type="application/json",
                                      content_encoding="utf-8", headers=headers)
    with pytest.raises(UndeliverableMessage) as caught:
        AsyncResult(task_id).get(timeout=60)
    assert caught.value.reason == "undecodable_body" and caught.value.queue == keys.ROUTE_QUEUE
    [entry] = [e for e in dead_letters.list_entries() if e["task_id"] == task_id]
    kept = json.loads(entry["raw"])
    assert base64.b64decode(kept["body"]) == b'{"broken": ' and kept["headers"] == headers
    answer = submit(agent_id="after-bad-bytes", prompt="still there?", max_tokens=16)
    assert answer.get(timeout=60)["endpoint_id"] == only.id

