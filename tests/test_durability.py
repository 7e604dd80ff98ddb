"""Nothing accepted is lost: broker data loss, whole-worker SIGKILL, broker restarts with
and without AOF, a Postgres outage and a lock held on the budgets table.

Every test runs on servers of its own, started here and killed by PID: a Redis server for
results and live figures (and the broker, unless the test restarts a broker of its own)
and a Postgres cluster (initdb + pg_ctl in a temporary directory, as the `postgres` user
when the tests run as root). Workers are real `aimesh worker` subprocesses with small
bounds (time limits, visibility timeout, re-publish bound) so that the tests wait seconds,
not minutes; every wait is for an event, with a generous bound that fails loudly. The
simulator's call log is the truth about upstream calls, the ledger the truth about charges.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import redis
from celery import Celery
from kombu import Connection
from sqlalchemy import create_engine, text

from aimesh_tasks import keys, redis_batch
from aimesh_tasks.budgets import set_budget
from aimesh_tasks.db import dispose_engines
from aimesh_tasks.db.migrate import upgrade
from aimesh_tasks.errors import ConfigError
from aimesh_tasks.governance import add_agent
from aimesh_tasks.keys import ROUTE_QUEUE, endpoint_queue
from aimesh_tasks.redis_client import reset_redis_clients
from aimesh_tasks.registry import Endpoint, add_endpoint
from aimesh_tasks.registry.cache import ENDPOINTS
from aimesh_tasks.settings import reset_settings
from aimesh_tasks.simulator import RunningSimulator
from benchmarks.chaos.invariants import base_key
from tests.budget_checks import assert_budget_invariants
from tests.tables import empty_tables
from tests.waits import wait_until

pytestmark = [pytest.mark.chaos, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[1]
AIMESH = str(Path(sys.executable).with_name("aimesh"))
PG_BIN = next(iter(sorted(Path("/usr/lib/postgresql").glob("*/bin"))), Path("/usr/bin"))
RESULTS_DB, LIVE_DB, BROKER_DB = 0, 1, 2
AS_ROOT = os.geteuid() == 0
# Bounds small enough that a lost message comes back in seconds (each test may add more).
SMALL_BOUNDS = {
    "AIMESH_TASK_SOFT_TIME_LIMIT_S": "4",
    "AIMESH_TASK_TIME_LIMIT_S": "5",
    "AIMESH_PROVIDER_TIMEOUT_S": "3",
    "AIMESH_VISIBILITY_TIMEOUT_S": "8",
    "AIMESH_REPUBLISH_AFTER_S": "4",
    "AIMESH_RECONCILE_INTERVAL_S": "0.5",
    "AIMESH_RESERVATION_TIMEOUT_S": "30",
    "AIMESH_REAPER_INTERVAL_S": "1",
    "AIMESH_FOLLOW_INTERVAL_S": "0.2",
    "AIMESH_FAILPOINTS": "",
    "AIMESH_RETRY_MAX_DELAY_S": "2",  # a countdown stays below half the visibility timeout
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class RedisServer:
    """A redis-server of this test on its own port and directory; AOF on or off."""

    def __init__(self, *, aof: bool = False, extra: tuple[str, ...] = ()) -> None:
        self.port = free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="aimesh-redis-"))
        self.args = ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1",
                     "--dir", str(self.dir), "--save", "", "--appendonly",
                     "yes" if aof else "no", "--appendfsync", "always", *extra]
        self.proc: subprocess.Popen[bytes] | None = None
        self.start()

    def url(self, db: int) -> str:
        return f"redis://127.0.0.1:{self.port}/{db}"

    def client(self, db: int) -> redis.Redis:
        return redis.Redis.from_url(self.url(db), socket_timeout=10)

    def start(self) -> None:
        with (self.dir / "redis.log").open("a") as log:
            self.proc = subprocess.Popen(self.args, stdout=log, stderr=subprocess.STDOUT,
                                         start_new_session=True)

        def up() -> bool:
            with suppress(redis.RedisError):
                return bool(self.client(0).ping())
            return False

        wait_until(up, f"redis-server on port {self.port} to answer", 30)

    def kill(self) -> None:
        """SIGKILL this server by its PID (what it had not written to its AOF is gone)."""
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.kill()
        shutil.rmtree(self.dir, ignore_errors=True)


class PostgresCluster:
    """A Postgres cluster of this test (initdb + pg_ctl) in a temporary directory."""

    def __init__(self) -> None:
        self.port = free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="aimesh-pg-"))
        self.data = self.dir / "data"
        if AS_ROOT:  # initdb refuses to run as root
            shutil.chown(self.dir, "postgres", "postgres")
        self._run([str(PG_BIN / "initdb"), "-D", str(self.data), "-U", "postgres",
                   "--auth", "trust", "--no-sync"])
        self.start()
        admin = create_engine(f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/postgres",
                              isolation_level="AUTOCOMMIT")
        with admin.connect() as connection:
            connection.execute(text("CREATE DATABASE aimesh"))
        admin.dispose()
        self.url = f"postgresql://postgres@127.0.0.1:{self.port}/aimesh"

    def _run(self, command: list[str]) -> None:
        if AS_ROOT:
            command = ["runuser", "-u", "postgres", "--", *command]
        subprocess.run(command, check=True, capture_output=True, cwd=self.dir)

    def start(self) -> None:
        self._run([str(PG_BIN / "pg_ctl"), "-D", str(self.data), "-l",
                   str(self.dir / "pg.log"), "-w", "-o",
                   f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1 "
                   "-c fsync=off -c max_connections=300", "start"])

    @property
    def pid(self) -> int | None:
        pidfile = self.data / "postmaster.pid"
        return int(pidfile.read_text().split()[0]) if pidfile.exists() else None

    def kill(self) -> None:
        """Stop the postmaster by its PID (SIGINT: fast shutdown, every client dropped)."""
        pid = self.pid
        assert pid is not None, "the test's Postgres is not running"
        os.kill(pid, signal.SIGINT)
        wait_until(lambda: not Path(f"/proc/{pid}").exists(),
                   f"the test's Postgres (pid {pid}) to stop", 60)

    def stop(self) -> None:
        if self.pid is not None:
            with suppress(ProcessLookupError):
                self.kill()
        shutil.rmtree(self.dir, ignore_errors=True)


@dataclass
class Servers:
    """The servers of this module, and the URLs the test process and workers use."""

    redis: RedisServer
    postgres: PostgresCluster
    env: dict[str, str] = field(default_factory=dict)


@pytest.fixture(scope="module")
def servers() -> Iterator[Servers]:
    """This module's own Redis server and Postgres cluster; the test process's settings
    point at them for the module's duration (and back afterwards)."""
    aux = RedisServer()
    postgres = PostgresCluster()
    env = {"AIMESH_DATABASE_URL": postgres.url, "AIMESH_REDIS_URL": aux.url(LIVE_DB),
           "AIMESH_RESULT_BACKEND": aux.url(RESULTS_DB),
           "AIMESH_BROKER_URL": aux.url(BROKER_DB)}
    with pytest.MonkeyPatch.context() as patch:
        for name, value in env.items():
            patch.setenv(name, value)
        _forget_clients()
        upgrade(postgres.url)
        try:
            yield Servers(aux, postgres, env)
        finally:
            _forget_clients()
            postgres.stop()
            aux.stop()
    _forget_clients()


def _forget_clients() -> None:
    reset_settings()
    reset_redis_clients()
    dispose_engines()
    ENDPOINTS.clear()


@pytest.fixture()
def fresh(servers: Servers) -> Iterator[Servers]:
    """Empty tables and Redis dbs before the test; workers the test started stopped after."""
    engine = create_engine(servers.postgres.url.replace("postgresql://",
                                                        "postgresql+psycopg://"))
    empty_tables(engine)
    engine.dispose()
    for db in (RESULTS_DB, LIVE_DB, BROKER_DB):
        servers.redis.client(db).flushdb()
    ENDPOINTS.clear()
    yield servers
    for worker in list(STARTED):
        worker.stop()


class Worker:
    """An `aimesh worker` subprocess in its own process group; `name` is its node name."""

    def __init__(self, role: list[str], env: dict[str, str]) -> None:
        self.name = f"durable-{uuid.uuid4().hex[:6]}"
        self.log = Path(f"/tmp/aimesh-test-{self.name}.log")
        self.log_file = self.log.open("w")
        self.proc = subprocess.Popen(
            [AIMESH, "worker", "-n", f"{self.name}@%h", "-l", "INFO", *role],
            env={**os.environ, **SMALL_BOUNDS, **env}, stdout=self.log_file,
            stderr=subprocess.STDOUT, start_new_session=True, cwd=ROOT)
        STARTED.append(self)

    def wait_ready(self) -> None:
        def ready() -> bool:
            if self.proc.poll() is not None:
                pytest.fail(f"worker {self.name} exited ({self.proc.returncode}): "
                            f"{self.log.read_text()[-3000:]}")
            return " ready." in self.log.read_text()

        wait_until(ready, f"worker {self.name} to be ready", 60,
                   seen=lambda: self.log.read_text()[-2000:])

    def kill_main(self) -> None:
        """SIGKILL the worker's main process only, as when a container's init is killed
        (prefork children die with it, by the PR_SET_PDEATHSIG Celery sets; `stop` ends
        any left)."""
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> None:
        if self in STARTED:
            STARTED.remove(self)
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                pass
        with suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)  # orphaned children, if any
        self.log_file.close()


STARTED: list[Worker] = []
ENDPOINT_CHILDREN = 4  # the endpoint worker's concurrency in start_workers


def start_workers(env: dict[str, str], *, router: str = "threads", endpoints: str = "threads"
                  ) -> tuple[Worker, Worker]:
    """A router worker and an endpoint worker (following the registry), both ready."""
    pair = (Worker(["--router", "-P", router, "-c", "4"], env),
            Worker(["--endpoints", "all", "-P", endpoints, "-c", str(ENDPOINT_CHILDREN)], env))
    for worker in pair:
        worker.wait_ready()
    return pair


def messages_for(agent: str, n: int, tag: str) -> list[dict[str, Any]]:
    """n messages with fresh prompts (no cache hit, no single-flight between them)."""
    return [{"id": f"{tag}-{i}-{uuid.uuid4().hex[:8]}", "agent_id": agent,
             "prompt": f"{tag} message {i} {uuid.uuid4().hex}", "max_tokens": 16}
            for i in range(n)]


def publish(broker_url: str, messages: list[dict[str, Any]], **options: Any) -> list[str]:
    """Accept each message through `RouteTask.apply_async` (what `submit()` calls),
    published to `broker_url`; their ids."""
    from aimesh_tasks.tasks.route import route_message

    with Connection(broker_url) as connection:
        for message in messages:
            route_message.apply_async((message,), connection=connection, **options)
    return [m["id"] for m in messages]


def queued(broker: redis.Redis, queue: str) -> int:
    """Messages on a queue, every priority level included (kombu keeps one list each)."""
    return sum(int(broker.llen(key)) for key in _queue_keys(broker, queue))


def pop_all(broker: redis.Redis, queue: str) -> int:
    """Take every message off a queue, as a consumer that dies right after its BRPOP."""
    popped = 0
    for key in _queue_keys(broker, queue):
        while broker.rpop(key) is not None:
            popped += 1
    return popped


def _queue_keys(broker: redis.Redis, queue: str) -> list[bytes]:
    return [queue.encode(), *broker.keys(queue.encode() + b"\x06\x16*")]


def results(servers: Servers, ids: list[str], store: redis.Redis | None = None
            ) -> dict[str, dict[str, Any]]:
    """The stored results of those of `ids` that have one: {id: {status, result, ...}},
    from the module's results db or `store`."""
    store = store or servers.redis.client(RESULTS_DB)
    raw = store.mget([f"celery-task-meta-{i}" for i in ids])
    return {i: json.loads(r) for i, r in zip(ids, raw, strict=True) if r is not None}


def wait_all_finished(servers: Servers, ids: list[str], timeout_s: float = 150,
                      workers: tuple[Worker, ...] = (), store: redis.Redis | None = None,
                      seen: dict[str, dict[str, Any]] | None = None
                      ) -> dict[str, dict[str, Any]]:
    """Wait until every id has a terminal result (in `store`, or among those `seen`
    before the store lost its data); fail naming how many do not, or at once when one of
    `workers` has exited."""
    def done() -> dict[str, dict[str, Any]] | None:
        for worker in workers:
            if worker.proc.poll() is not None:
                pytest.fail(f"worker {worker.name} exited ({worker.proc.returncode}): "
                            f"{worker.log.read_text()[-3000:]}")
        found = {**(seen or {}), **results(servers, ids, store)}
        ready = {i: r for i, r in found.items() if r["status"] in ("SUCCESS", "FAILURE",
                                                                   "REVOKED")}
        return ready if len(ready) == len(ids) else None

    def missing() -> str:
        found = {**(seen or {}), **results(servers, ids, store)}
        absent = [i for i in ids if i not in found]
        return f"{len(absent)} of {len(ids)} without a result, e.g. {absent[:3]}"

    return wait_until(done, f"all {len(ids)} messages to reach a terminal state", timeout_s,
                      seen=missing)


def assert_all_succeeded(found: dict[str, dict[str, Any]]) -> None:
    failed = {i: r["result"] for i, r in found.items() if r["status"] != "SUCCESS"}
    assert not failed, f"{len(failed)} messages did not succeed: {list(failed.items())[:3]}"


def rows(servers: Servers, query: str, **params: Any) -> list[Any]:
    engine = create_engine(servers.postgres.url.replace("postgresql://",
                                                        "postgresql+psycopg://"))
    try:
        with engine.begin() as connection:
            return list(connection.execute(text(query), params))
    finally:
        engine.dispose()


def assert_charges_match_calls(servers: Servers, sim: RunningSimulator, *,
                               lost_allowed: bool = False, cut_by_kill: int = 0) -> None:
    """Every answered upstream call has one ledger row under its call key, at its usage
    (kind `call`; or, only when a kill left the system unable to know, flagged `lost` or
    `reaped`), and no row charges a call the provider never received, but for at most
    `cut_by_kill` calls a SIGKILL cut between their claim and their request: the claim is
    written before the request goes out (a kill after the request can never leave it
    uncharged), so the delivery that takes such a call over cannot tell it from one the
    provider received, charges it at its estimate (`lost`, or `reaped` by the reaper) and
    makes it again under a new key. Each of those is flagged, and answered under its redo."""
    assert_budget_invariants()
    calls = {c["call_key"]: c for c in sim.calls() if c["status"] == 200}
    ledger = {r.call_key: r for r in rows(servers, "SELECT call_key, tokens, kind "
                                                   "FROM budget_ledger")}
    uncharged, unanswered = set(calls) - set(ledger), set(ledger) - set(calls)
    redone = {base_key(k) for k in calls if base_key(k) != k}
    cut = {k for k in unanswered if ledger[k].kind in ("lost", "reaped")
           and base_key(k) in redone}
    assert not uncharged and unanswered == cut and len(cut) <= cut_by_kill, (
        f"calls without a charge: {sorted(uncharged)[:5]}; charges without a call: "
        f"{sorted((k, ledger[k].kind) for k in unanswered)[:5]} (of which "
        f"{len(cut)} flagged and redone; at most {cut_by_kill} may be cut by a kill)")
    wrong = [(k, r.tokens, calls[k]["prompt_tokens"] + calls[k]["completion_tokens"])
             for k, r in ledger.items() if r.kind == "call"
             and r.tokens != calls[k]["prompt_tokens"] + calls[k]["completion_tokens"]]
    assert not wrong, f"charged tokens differ from the provider's: {wrong[:5]}"
    flagged = [(k, r.kind) for k, r in ledger.items() if r.kind != "call"]
    assert lost_allowed or not flagged, f"flagged charges although nothing was killed: {flagged}"


def assert_no_call_made_again(servers: Servers, sim: RunningSimulator) -> None:
    """No call (message + attempt) was billed more often than once, plus once for each of
    its charges at an estimate (`lost`, `reaped`: a call that may have reached the
    provider and left no answer, so its redo was right)."""
    billed = Counter(base_key(c["call_key"]) for c in sim.calls() if c["status"] == 200)
    explained = Counter(base_key(r.call_key) for r in rows(
        servers, "SELECT call_key FROM budget_ledger WHERE kind IN ('lost', 'reaped')"))
    again = {key: n for key, n in billed.items() if n > 1 + explained[key]}
    assert not again, f"{len(again)} calls made again, e.g. {sorted(again.items())[:3]}"


def metered_endpoint(sim: RunningSimulator | Any, agent: str) -> Endpoint:
    """A metered agent (budget 50 USD) and one endpoint at `sim` (or a gate in front)."""
    add_agent(agent)
    set_budget(agent, usd="50")
    return add_endpoint(id=f"sim-{uuid.uuid4().hex[:6]}", base_url=sim.url, model="sim-model",
                        input_usd_per_1k="0.001", output_usd_per_1k="0.002", capacity=1000)


def accepted_states(servers: Servers, ids: list[str]) -> dict[str, tuple[str, int, bool]]:
    """{id: (state, times re-published, message still stored)} of the accepted record."""
    found = rows(servers, "SELECT message_id, state, republished, message IS NOT NULL AS kept "
                          "FROM accepted_messages WHERE message_id = ANY(:ids)", ids=ids)
    return {r.message_id: (r.state, r.republished, r.kept) for r in found}


def wait_accepted_finished(servers: Servers, ids: list[str]) -> dict[str, tuple[str, int, bool]]:
    """Wait until the reconciler noted every message as finished (its marks applied)."""
    def finished() -> dict[str, tuple[str, int, bool]] | None:
        states = accepted_states(servers, ids)
        done = len(states) == len(ids) and all(s[0] == "finished" for s in states.values())
        return states if done else None

    return wait_until(finished, "every accepted record to be finished", 60,
                      seen=lambda: sorted(accepted_states(servers, ids).values())[:5])


def test_a_message_lost_before_any_worker_saw_it_is_published_again(
        fresh: Servers, simulator: Callable[..., RunningSimulator]) -> None:
    """The kombu Redis transport's BRPOP-before-unacked window: a consumer killed between
    the two has taken the message off the queue and recorded it nowhere. Here the test is
    that consumer: it pops the messages itself, then workers start. The reconciler
    publishes each again, once, and each is answered with one call and one charge."""
    sim = simulator()
    metered_endpoint(sim, "durable-popped")
    broker = fresh.redis.client(BROKER_DB)
    ids = publish(fresh.env["AIMESH_BROKER_URL"], messages_for("durable-popped", 5, "popped"))
    assert pop_all(broker, ROUTE_QUEUE) == len(ids) and queued(broker, ROUTE_QUEUE) == 0
    start_workers({})
    assert_all_succeeded(wait_all_finished(fresh, ids))
    states = wait_accepted_finished(fresh, ids)
    assert {(republished, kept) for _, republished, kept in states.values()} == {(1, False)}
    assert len([c for c in sim.calls() if c["status"] == 200]) == len(ids)
    assert_charges_match_calls(fresh, sim)


def test_a_hand_off_lost_after_routing_is_published_again(
        fresh: Servers, simulator: Callable[..., RunningSimulator]) -> None:
    """A message seen by its router whose call task is then lost (here: popped off the
    endpoint queue before any endpoint worker runs) is published again once the bound for
    seen messages passes; its routing task reuses the first hand-off (same reservation)."""
    sim = simulator()
    endpoint = metered_endpoint(sim, "durable-handoff")
    broker = fresh.redis.client(BROKER_DB)
    router = Worker(["--router", "-P", "threads", "-c", "4"], {})
    router.wait_ready()
    ids = publish(fresh.env["AIMESH_BROKER_URL"], messages_for("durable-handoff", 5, "handoff"))
    queue = endpoint_queue(endpoint.id)
    wait_until(lambda: queued(broker, queue) == len(ids), f"{len(ids)} hand-offs on {queue}",
               60, seen=lambda: queued(broker, queue))
    live = fresh.redis.client(LIVE_DB)

    def unseen() -> list[str]:  # its routing task's mark, in Redis or applied to Postgres
        states = accepted_states(fresh, ids)
        return [i for i in ids if states[i][0] != "seen"
                and not live.sismember(keys.accepted_seen(), i)]

    wait_until(lambda: not unseen(), "every routed message marked seen", 30, seen=unseen)
    assert pop_all(broker, queue) == len(ids)
    Worker(["--endpoints", "all", "-P", "threads", "-c", "4"], {}).wait_ready()
    assert_all_succeeded(wait_all_finished(fresh, ids))
    states = wait_accepted_finished(fresh, ids)
    assert {(republished, kept) for _, republished, kept in states.values()} == {(1, False)}
    reservations = rows(fresh, "SELECT message_id, count(*) AS n FROM budget_reservations "
                               "GROUP BY message_id")
    assert {r.n for r in reservations} == {1} and len(reservations) == len(ids)
    assert len([c for c in sim.calls() if c["status"] == 200]) == len(ids)
    assert_charges_match_calls(fresh, sim)


# With AOF on, the visibility timeout is an hour: a message left unacked by the connection
# loss would stall past the test's bound, or be published again by the reconciler (40 s).
# With AOF off, the reconciler moves finished marks to Postgres every 3 s: the messages
# that finished in the last seconds before the kill lose their mark with Redis, and are
# published again although their calls were settled.
RESTART_BOUNDS = {
    True: {"AIMESH_VISIBILITY_TIMEOUT_S": "3600", "AIMESH_REPUBLISH_AFTER_S": "40",
           "AIMESH_RESERVATION_TIMEOUT_S": "7200"},
    False: {"AIMESH_RECONCILE_INTERVAL_S": "3"},
}


@pytest.mark.timeout(300)
@pytest.mark.parametrize("aof", [True, False], ids=["aof-on", "aof-off"])
def test_broker_restart_mid_burst_loses_and_stalls_nothing(
        fresh: Servers, simulator: Callable[..., RunningSimulator], aof: bool) -> None:
    """The broker Redis is SIGKILLed mid-burst and started again 3 s later on the same
    port. Workers reconnect; every accepted message succeeds (none with TaskRevokedError).
    With AOF on, what was unacked does not wait for the visibility timeout (an hour here):
    among the messages are two with a countdown, which a worker holds unacked until they
    are due and which the connection loss takes from it; they finish without the
    reconciler's help (a message caught in the BRPOP window may need it). With AOF off,
    the one Redis holds the broker, the results and the live state (journal, hand-offs,
    leases, marks), as in the chaos row: the messages it forgot are published again from
    the accepted record, and a call already settled is answered from its settlement,
    never made again."""
    sim = simulator(latency_ms=150)
    metered_endpoint(sim, "durable-restart")
    broker = RedisServer(aof=aof)
    env = {"AIMESH_BROKER_URL": broker.url(0), **RESTART_BOUNDS[aof]}
    if not aof:
        env |= {"AIMESH_REDIS_URL": broker.url(LIVE_DB),
                "AIMESH_RESULT_BACKEND": broker.url(RESULTS_DB)}
    store = None if aof else broker.client(RESULTS_DB)
    try:
        workers = start_workers(env)
        later = publish(broker.url(0), messages_for("durable-restart", 2, "later"), countdown=10)
        ids = later + publish(broker.url(0), messages_for("durable-restart", 80, "restart"))
        wait_until(lambda: len(results(fresh, ids, store)) >= 10, "10 messages answered", 120,
                   seen=lambda: len(results(fresh, ids, store)))
        seen = results(fresh, ids, store)  # what producers read before the results were lost
        broker.kill()
        time.sleep(3)  # the outage itself, not a wait for something to happen
        broker.start()
        assert_all_succeeded(wait_all_finished(fresh, ids, timeout_s=180, workers=workers,
                                               store=store, seen=seen))
        assert_charges_match_calls(fresh, sim, lost_allowed=not aof)
        assert_no_call_made_again(fresh, sim)
        states = wait_accepted_finished(fresh, ids)
        if aof:
            assert [states[i][1] for i in later] == [0, 0], "restored by the reconciler"
        else:
            assert any(republished for _, republished, _ in states.values())
    finally:
        broker.stop()


@pytest.mark.timeout(240)
def test_endpoint_worker_main_process_sigkilled_mid_burst_loses_nothing(
        fresh: Servers, simulator: Callable[..., RunningSimulator]) -> None:
    """The endpoint worker's main process is SIGKILLed during a burst (its prefork
    children die with it: Celery sets PR_SET_PDEATHSIG), and a replacement starts, as a
    supervisor would. What the dead consumer had taken comes back after the visibility
    timeout (8 s here), what it had popped but not yet recorded as unacked comes back from
    the reconciler; every message succeeds, and every upstream call is charged once (a
    child killed between its claim and its request leaves a `lost` charge for a call the
    provider never received: at most one per child, each redone)."""
    sim = simulator(latency_ms=200)
    metered_endpoint(sim, "durable-kill")
    router, endpoints = start_workers({}, endpoints="prefork")
    ids = publish(fresh.env["AIMESH_BROKER_URL"], messages_for("durable-kill", 60, "kill"))
    wait_until(lambda: len(results(fresh, ids)) >= 10, "10 messages answered", 120,
               seen=lambda: len(results(fresh, ids)))
    endpoints.kill_main()
    assert len(results(fresh, ids)) < len(ids), "the burst ended before the kill"
    Worker(["--endpoints", "all", "-P", "prefork", "-c", "3"], {}).wait_ready()
    assert_all_succeeded(wait_all_finished(fresh, ids, timeout_s=180))
    wait_accepted_finished(fresh, ids)
    assert_charges_match_calls(fresh, sim, lost_allowed=True, cut_by_kill=ENDPOINT_CHILDREN)


# Retries ride out a minute of outage: backoff capped at 30 s needs a visibility timeout of
# at least 60 s (a countdown stays below half of it).
OUTAGE_BOUNDS = {"AIMESH_VISIBILITY_TIMEOUT_S": "60", "AIMESH_RESERVATION_TIMEOUT_S": "120",
                 "AIMESH_RETRY_MAX_DELAY_S": "30"}


def _logs(workers: tuple[Worker, ...]) -> str:
    return "".join(w.log.read_text() for w in workers)


@pytest.mark.timeout(300)
def test_postgres_stopped_mid_run_every_metered_message_finishes(
        fresh: Servers, simulator: Callable[..., RunningSimulator],
        gate: Callable[[RunningSimulator], Any]) -> None:
    """Postgres is stopped for 15 s while a metered agent's burst runs: four calls have
    been answered by the provider (their answers held at a gate until Postgres is down, so
    they are journalled and cannot be settled), the rest wait to reserve. Every message
    succeeds once Postgres is back, none with a raw driver error; the four bought answers
    are finished from their journal (one upstream call each), and spend is exact."""
    sim = simulator()
    held = gate(sim)
    metered_endpoint(held, "durable-pg")
    workers = start_workers(OUTAGE_BOUNDS)
    ids = publish(fresh.env["AIMESH_BROKER_URL"], messages_for("durable-pg", 30, "pg"))
    held.wait_held(4)
    bought = {c["call_key"] for c in sim.calls()}
    assert len(bought) == 4
    fresh.postgres.kill()
    held.open()
    time.sleep(15)  # the outage itself
    fresh.postgres.start()
    dispose_engines()  # this process's pooled connections died with the server
    assert_all_succeeded(wait_all_finished(fresh, ids, timeout_s=240))
    calls_per_key: dict[str, int] = {}
    for call in sim.calls():
        calls_per_key[call["call_key"]] = calls_per_key.get(call["call_key"], 0) + 1
    assert {calls_per_key[k] for k in bought} == {1}, "a bought answer was bought again"
    kinds = rows(fresh, "SELECT call_key, kind FROM budget_ledger WHERE call_key = ANY(:k)",
                 k=list(bought))
    assert sorted(r.kind for r in kinds) == ["call"] * 4
    assert_charges_match_calls(fresh, sim)
    assert "OperationalError" in _logs(workers), "the outage never reached a task"


@pytest.mark.timeout(300)
def test_a_lock_held_on_the_budgets_table_makes_tasks_retry_not_fail(
        fresh: Servers, simulator: Callable[..., RunningSimulator]) -> None:
    """Another session holds an ACCESS EXCLUSIVE lock on `budgets` for 15 s while a
    metered agent's messages arrive: each reservation gives up after the lock timeout
    (1 s here) and its task retries; once the lock is released every message succeeds and
    spend is exact."""
    sim = simulator()
    metered_endpoint(sim, "durable-lock")
    workers = start_workers({**OUTAGE_BOUNDS, "AIMESH_DB_LOCK_TIMEOUT_S": "1"})
    engine = create_engine(fresh.postgres.url.replace("postgresql://", "postgresql+psycopg://"))
    try:
        with engine.connect() as locker:
            locker.execute(text("LOCK TABLE budgets IN ACCESS EXCLUSIVE MODE"))
            ids = publish(fresh.env["AIMESH_BROKER_URL"], messages_for("durable-lock", 20,
                                                                       "lock"))
            wait_until(lambda: "LockNotAvailable" in _logs(workers),
                       "a task to give up waiting for the lock", 60)
            time.sleep(15)  # the lock is held this long
            locker.rollback()
        assert_all_succeeded(wait_all_finished(fresh, ids, timeout_s=240))
    finally:
        engine.dispose()
    assert_charges_match_calls(fresh, sim)


def test_a_redis_broker_that_evicts_is_refused_at_start_up(fresh: Servers) -> None:
    """maxmemory-policy other than noeviction: the check names the setting and the fix,
    and `aimesh worker` refuses to start (non-zero exit, the reason in its output)."""
    from aimesh_tasks.app import check_broker_keeps_messages

    check_broker_keeps_messages(fresh.redis.url(BROKER_DB))  # noeviction: accepted
    evicting = RedisServer(extra=("--maxmemory-policy", "allkeys-lru"))
    try:
        with pytest.raises(ConfigError) as refused:
            check_broker_keeps_messages(evicting.url(0))
        assert refused.value.fields["setting"] == "maxmemory-policy"
        assert "CONFIG SET maxmemory-policy noeviction" in refused.value.message
        worker = Worker(["--router", "-P", "threads", "-c", "1"],
                        {"AIMESH_BROKER_URL": evicting.url(0)})
        assert worker.proc.wait(60) != 0
        assert "maxmemory-policy" in worker.log.read_text()
    finally:
        evicting.stop()


def _probe_app(servers: Servers) -> Celery:
    """A bare Celery app on this module's broker and results (JSON only), for calling the
    reconciler in this process."""
    # Not the current app: later tests' AsyncResult() without an app must not use it.
    probe = Celery("durability-probe", broker=servers.redis.url(BROKER_DB),
                   backend=servers.redis.url(RESULTS_DB), set_as_current=False)
    probe.conf.update(task_serializer="json", result_serializer="json",
                      accept_content=["json"], result_accept_content=["json"])
    return probe


def _queued_ids(broker: redis.Redis, queue: str) -> list[str]:
    return [json.loads(raw)["headers"]["id"] for key in _queue_keys(broker, queue)
            for raw in broker.lrange(key, 0, -1)]


def test_one_reconciler_pass(fresh: Servers, monkeypatch: pytest.MonkeyPatch) -> None:
    """Marks move to Postgres; a quiet message with a result is only marked finished; one
    re-published too often fails with UndeliverableMessage; a seen one waits for the
    longer bound; the rest are published again under their own id; old finished rows go."""
    from aimesh_tasks.delivery import accepted
    from aimesh_tasks.delivery.reconciler import reconcile
    from aimesh_tasks.messages import AiMessage

    monkeypatch.setenv("AIMESH_REPUBLISH_AFTER_S", "0.01")
    reset_settings()
    made = {name: AiMessage(id=f"{name}-{uuid.uuid4().hex[:6]}", agent_id="durable-unit",
                            prompt=f"{name} prompt", max_tokens=8)
            for name in ("answered", "tired", "seen", "finished", "lost", "old")}
    for message in made.values():
        assert accepted.record(message)
    assert not accepted.record(made["lost"]), "a second record of an id inserts nothing"
    probe = _probe_app(fresh)
    probe.backend.store_result(made["answered"].id, {"ok": True}, "SUCCESS")
    tired = made["tired"].id
    rows(fresh, "UPDATE accepted_messages SET republished = 5 WHERE message_id = :i "
                "RETURNING 1", i=tired)
    redis_batch.send(lambda batch: accepted.queue_seen(batch, made["seen"].id))
    accepted.note_finished(made["finished"].id)
    accepted.mark_finished([made["old"].id])
    rows(fresh, "UPDATE accepted_messages SET updated_at = now() - interval '2 days' "
                "WHERE message_id = :i RETURNING 1", i=made["old"].id)
    time.sleep(0.05)  # past the (0.01 s) bound: time must pass for a message to be quiet

    counts = reconcile(probe)

    assert counts == {"seen": 1, "finished": 1, "answered": 1, "republished": 1, "failed": 1,
                      "purged": 1}
    states = accepted_states(fresh, [m.id for m in made.values()])
    assert states == {made["answered"].id: ("finished", 0, False),
                      tired: ("finished", 5, False),
                      made["seen"].id: ("seen", 0, True),
                      made["finished"].id: ("finished", 0, False),
                      made["lost"].id: ("accepted", 1, True)}
    assert _queued_ids(fresh.redis.client(BROKER_DB), ROUTE_QUEUE) == [made["lost"].id]
    failure = results(fresh, [tired])[tired]
    assert failure["status"] == "FAILURE"
    assert failure["result"]["exc_type"] == "UndeliverableMessage"
    assert "never finished" in str(failure["result"]["exc_message"])


def test_a_message_is_accepted_while_postgres_is_unreachable(
        fresh: Servers, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without its database the record is skipped with one log line, and the message is
    published all the same (a database outage is not an outage for producers); a step of
    a canvas is never recorded (it is published again by its workflow, not alone)."""
    broker = fresh.redis.client(BROKER_DB)
    message = messages_for("durable-unit", 1, "canvas")
    publish(fresh.env["AIMESH_BROKER_URL"], message, group_id=uuid.uuid4().hex)
    assert accepted_states(fresh, [message[0]["id"]]) == {}
    monkeypatch.setenv("AIMESH_DATABASE_URL", f"postgresql://postgres@127.0.0.1:{free_port()}/x")
    _forget_clients()
    try:
        ids = publish(fresh.env["AIMESH_BROKER_URL"], messages_for("durable-unit", 1, "nodb"))
    finally:
        monkeypatch.setenv("AIMESH_DATABASE_URL", fresh.postgres.url)
        _forget_clients()
    assert set(ids) <= set(_queued_ids(broker, ROUTE_QUEUE))
    assert accepted_states(fresh, ids) == {}


def test_transient_retries_back_off_with_a_floor() -> None:
    """Each wait is between half and all of its exponential step (capped at 30 s and at
    half the visibility timeout): the default 8 retries span at least a minute."""
    from aimesh_tasks.tasks.shell import backoff_s

    floors = []
    for retries in range(8):
        step = min(30, 2 ** retries)
        waits = [backoff_s(retries) for _ in range(200)]
        assert step / 2 <= min(waits) and max(waits) <= step
        floors.append(step / 2)
    assert sum(floors) >= 60


def test_accepted_keys() -> None:
    from aimesh_tasks import keys

    assert keys.accepted_seen() == "aimesh:accepted:seen"
    assert keys.accepted_finished() == "aimesh:accepted:finished"
    assert keys.reconcile_lock() == "aimesh:accepted:reconcile:lock"
