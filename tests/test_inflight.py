"""Many calls in flight in one endpoint worker process (issue 18, goal 3), and the pools
sized for them (aimesh_tasks/pools.py).

The end-to-end test holds every provider answer at the simulator until HELD calls wait
there at once (SimulatorConfig.hold_in_flight): nothing is answered before one threads
worker process has HELD calls open together, far beyond the 64 threads endpoint workers
ran before, however slow the machine. It waits for that event, never for the clock.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import pytest
import redis
from celery.concurrency.prefork import TaskPool as PreforkPool
from celery.concurrency.thread import TaskPool as ThreadPool
from sqlalchemy import select

from aimesh_tasks import pools, submit
from aimesh_tasks.app import app
from aimesh_tasks.budgets import set_budget
from aimesh_tasks.db import LedgerRow, dispose_engines, get_engine, session_scope
from aimesh_tasks.db.engine import DbPoolExhausted
from aimesh_tasks.governance.agents import add_agent
from aimesh_tasks.keys import endpoint_queue
from aimesh_tasks.money import call_cost_nusd
from aimesh_tasks.outages import TRANSIENT
from aimesh_tasks.redis_client import RedisPoolExhausted, get_redis, reset_redis_clients
from aimesh_tasks.registry import Endpoint
from aimesh_tasks.settings import reset_settings
from aimesh_tasks.simulator import RunningSimulator
from tests.budget_checks import assert_budget_invariants
from tests.observability_parts import only_these_workers
from tests.processes import start_workers

HELD = 300
CONCURRENCY = 1000  # endpoint workers as deployed (docker-compose.yml, deploy/)
# The first call waits at the simulator until the last one arrives, however long routing
# HELD messages takes on a loaded machine: read timeout and time limits far above that.
PATIENT = {"AIMESH_PROVIDER_TIMEOUT_S": "600", "AIMESH_TASK_SOFT_TIME_LIMIT_S": "840",
           "AIMESH_TASK_TIME_LIMIT_S": "900", "AIMESH_VISIBILITY_TIMEOUT_S": "1200",
           "AIMESH_RESERVATION_TIMEOUT_S": "2400"}


@contextmanager
def settings_env(**values: str) -> Iterator[None]:
    """AIMESH_* variables set for the block, the settings read again on entry and exit."""
    saved = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    reset_settings()
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        reset_settings()


def test_pools_take_the_tasks_each_process_runs_at_once(monkeypatch: pytest.MonkeyPatch
                                                        ) -> None:
    assert (pools.pool_alias(ThreadPool), pools.pool_alias(PreforkPool)) == ("threads", "prefork")
    assert pools.pool_alias("gevent") == "gevent"
    assert pools.tasks_per_process("threads", CONCURRENCY) == CONCURRENCY
    assert pools.tasks_per_process("prefork", 8) == pools.tasks_per_process("solo", 1) == 1
    monkeypatch.setattr(pools, "_tasks", None)
    assert pools.redis_connections() == pools.OUTSIDE_A_WORKER  # the ingress, the CLI
    assert pools.size_for_worker(PreforkPool, 4) == 1
    assert pools.redis_connections() == 1 + pools.BACKGROUND_THREADS
    assert pools.size_for_worker(ThreadPool, CONCURRENCY) == CONCURRENCY
    sized = CONCURRENCY + pools.BACKGROUND_THREADS
    assert pools.redis_connections() == pools.SHARED_REDIS_CONNECTIONS  # they take turns
    celery = pools.celery_settings(app.conf)
    assert celery["result_backend_thread_safe"] is True
    assert celery["redis_max_connections"] == celery["broker_pool_limit"] == sized
    assert celery["broker_transport_options"]["max_connections"] == sized
    assert celery["broker_transport_options"]["visibility_timeout"] == (
        app.conf.broker_transport_options["visibility_timeout"])  # the rest kept
    with settings_env(AIMESH_REDIS_MAX_CONNECTIONS="50"):
        assert pools.redis_connections() == 50


@pytest.mark.usefixtures("servers")
def test_a_redis_pool_with_every_connection_busy_fails_naming_the_fix() -> None:
    reset_redis_clients()
    try:
        with settings_env(AIMESH_REDIS_MAX_CONNECTIONS="1", AIMESH_REDIS_TIMEOUT_S="0.2"):
            client = get_redis()
            held = client.connection_pool.get_connection()
            try:
                with pytest.raises(RedisPoolExhausted) as caught:
                    client.ping()
            finally:
                client.connection_pool.release(held)
            assert client.ping()  # free again
    finally:
        reset_redis_clients()
    assert "all 1 Redis connections" in str(caught.value)
    assert "AIMESH_REDIS_MAX_CONNECTIONS" in str(caught.value)
    assert isinstance(caught.value, redis.ConnectionError) and isinstance(caught.value, TRANSIENT)


def test_a_postgres_pool_with_every_connection_busy_fails_naming_the_fix(database: str) -> None:
    dispose_engines()
    try:
        with settings_env(AIMESH_DB_POOL_SIZE="1", AIMESH_DB_POOL_TIMEOUT_S="0.2"):
            engine = get_engine()
            with engine.connect(), pytest.raises(DbPoolExhausted) as caught:
                engine.connect()
            with engine.connect():  # given back: free again
                pass
    finally:
        dispose_engines()
    message = str(caught.value)
    assert "all 1 Postgres connections" in message and "AIMESH_DB_POOL_SIZE" in message
    assert isinstance(caught.value, TRANSIENT)


def _ledger(agent_id: str) -> list[LedgerRow]:
    with session_scope() as session:
        return list(session.scalars(select(LedgerRow).where(LedgerRow.agent_id == agent_id)))


@pytest.mark.timeout(900)  # routing HELD messages through two processes on a shared box
def test_one_endpoint_process_holds_hundreds_of_calls_and_charges_each_once(
        simulator: Callable[..., RunningSimulator], endpoint: Callable[..., Endpoint]) -> None:
    sim = simulator(hold_in_flight=HELD)
    target = endpoint(sim, "inflight", capacity=10 * HELD)  # the registry must not cap it
    agent = f"inflight-{uuid.uuid4().hex[:6]}"
    add_agent(agent)
    set_budget(agent, usd="100")
    tag = uuid.uuid4().hex[:6]
    router, worker = start_workers([
        (f"router-{tag}", ["celery", "-Q", "aimesh.route", "-P", "prefork", "-c", "2"]),
        (f"inflight-{tag}", ["--endpoints", target.id, "-P", "threads", "-c", str(CONCURRENCY)]),
    ], env=PATIENT)
    try:
        with only_these_workers({router.hostname, worker.hostname}, [endpoint_queue(target.id)]):
            pending = [submit(agent_id=agent, prompt=f"held call {i}", max_tokens=16)
                       for i in range(HELD)]
            results = [p.get(timeout=900) for p in pending]
            pool = app.control.inspect(destination=[worker.hostname], timeout=10).stats()
    finally:
        router.stop()
        worker.stop()
    assert sim.in_flight()["max_in_flight"] >= HELD  # the hold opened: all at once
    assert pool[worker.hostname]["pool"]["max-concurrency"] == CONCURRENCY
    assert pool[worker.hostname]["pool"]["threads"] >= HELD  # one process, a thread per call
    assert {r["endpoint_id"] for r in results} == {target.id}
    calls = sim.calls()
    assert len(calls) == sim.stats()["calls"] == HELD
    assert all(c["status"] == 200 and not c["disconnected"] for c in calls)
    ledger = _ledger(agent)
    assert len(ledger) == HELD and {row.kind for row in ledger} == {"call"}
    assert len({row.call_key for row in ledger}) == HELD
    assert sum(row.nusd for row in ledger) == sum(
        call_cost_nusd(c["prompt_tokens"], c["completion_tokens"], target.input_nusd_per_1k,
                       target.output_nusd_per_1k) for c in calls)
    assert_budget_invariants()
    log = worker.log.read_text()
    assert "PoolExhausted" not in log and "Too many connections" not in log, log[-3000:]
