"""Rows that take a server away: the broker Redis killed and restarted (with and without
its AOF), paused with SIGSTOP, full under `noeviction`; Postgres stopped; a lock held on
the budgets table. Each fault starts once a share of the load has finished (an event,
not a time) and lasts a fixed time (the fault itself, scaled down for the suite)."""

from __future__ import annotations

import threading
import time

from benchmarks.chaos.runner import THREADS, Row, RowRun

RESTART_GAP_S = 3
PRODUCER_BOUND_S = 180


def _restart_redis(run: RowRun) -> None:
    """kill -9 the Redis (broker, results and live state), start it again 3 s later."""
    run.submit(run.size)
    run.wait_finished(run.size // 3)
    redis = run.cluster.redis
    redis.kill()
    time.sleep(RESTART_GAP_S)  # the outage itself
    redis.start()
    run.notes.append(f"Redis killed and restarted (AOF {'on' if redis.aof else 'off'})")


def _pause_redis(run: RowRun) -> None:
    """SIGSTOP the Redis while a producer keeps submitting; SIGCONT after the pause."""
    run.submit(run.size // 2)
    run.wait_finished(run.size // 4)
    pause_s = run.fault_s(30)
    producer = threading.Thread(target=run.submit, args=(run.size - run.size // 2,))
    run.cluster.redis.pause()
    producer.start()
    time.sleep(pause_s)  # the outage itself
    run.cluster.redis.resume()
    producer.join(PRODUCER_BOUND_S)
    if producer.is_alive():
        run.problems.append(f"a producer was still blocked {PRODUCER_BOUND_S} s after the pause")
    run.notes.append(f"Redis paused {pause_s:g} s; submits meanwhile blocked, then went on")


def _fill_redis(run: RowRun) -> None:
    """Set maxmemory below what Redis holds (noeviction): submits must fail visibly;
    then lift the limit and submit the rest."""
    import redis

    client = redis.Redis(port=run.cluster.redis.port)
    quarter = run.size // 4
    run.submit(2 * quarter)
    run.wait_finished(quarter)
    used = int(client.info("memory")["used_memory"])
    client.config_set("maxmemory-policy", "noeviction")
    client.config_set("maxmemory", str(max(1, used // 2)))
    accepted = len(run.submit(quarter))
    time.sleep(run.fault_s(10))  # the outage itself
    client.config_set("maxmemory", "0")
    run.submit(run.size - 3 * quarter)
    run.notes.append(f"Redis full: {quarter - accepted} of {quarter} submits refused "
                     f"({dict(run.work.refused)})")
    if accepted == quarter:
        run.problems.append("no submit failed while Redis was full")


def _stop_postgres(run: RowRun) -> None:
    """pg_ctl stop -m fast mid-run, start again after the outage."""
    from aimesh_tasks.db import dispose_engines

    run.submit(run.size)
    run.wait_finished(run.size // 4)
    outage_s = run.fault_s(15)
    run.cluster.postgres.stop("fast")
    time.sleep(outage_s)  # the outage itself
    run.cluster.postgres.start()
    dispose_engines()
    run.notes.append(f"Postgres stopped {outage_s:g} s")


def _lock_budgets(run: RowRun) -> None:
    """Hold an ACCESS EXCLUSIVE lock on the budgets table mid-run."""
    import psycopg

    run.submit(run.size)
    run.wait_finished(run.size // 4)
    hold_s = run.fault_s(15)
    with psycopg.connect(run.cluster.postgres.url) as connection:
        connection.execute("LOCK TABLE budgets IN ACCESS EXCLUSIVE MODE")
        time.sleep(hold_s)  # the lock held
    run.notes.append(f"budgets locked {hold_s:g} s")


ROWS = [
    Row("redis-restart-aof", "broker Redis kill -9, back after 3 s, AOF on", _restart_redis,
        endpoints=list(THREADS), sims={"a": {"latency_ms": 100}}, aof=True),
    Row("redis-restart-noaof", "broker Redis kill -9, back after 3 s, AOF off (data gone)",
        _restart_redis, endpoints=list(THREADS), sims={"a": {"latency_ms": 100}}, aof=False),
    Row("redis-pause", "Redis paused (SIGSTOP) 30 s under load", _pause_redis,
        endpoints=list(THREADS), sims={"a": {"latency_ms": 100}}, drain_bound_s=240),
    Row("redis-full", "broker Redis full under noeviction", _fill_redis,
        endpoints=list(THREADS), sims={"a": {"latency_ms": 100}}),
    Row("postgres-stop", "Postgres stopped 15 s mid-run", _stop_postgres,
        endpoints=list(THREADS), sims={"a": {"latency_ms": 100}}, drain_bound_s=240),
    Row("postgres-lock", "ACCESS EXCLUSIVE lock on budgets held 15 s", _lock_budgets,
        endpoints=list(THREADS), sims={"a": {"latency_ms": 100}}),
]
