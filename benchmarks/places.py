"""Where a benchmark keeps its data, so that two benchmarks can run side by side.

AIMESH_BENCH_DBS="b,l" picks the Redis dbs for the broker/results (b) and the live
figures (l), default "2,3"; the Postgres database is `aimesh_bench`, or
`aimesh_bench_<b>_<l>` when AIMESH_BENCH_DBS is set. AIMESH_BENCH_REDIS names another
Redis server. AIMESH_BENCH_BROKER=rabbitmq moves the broker to RabbitMQ on 127.0.0.1:5672
(AIMESH_BENCH_RABBITMQ moves it), vhost `aimesh_bench_<b>_<l>`, made empty by
`prepare_broker()`; results stay in Redis. Import this before aimesh_tasks: `ENV` goes
into os.environ here.
"""

from __future__ import annotations

import os

REDIS = os.environ.get("AIMESH_BENCH_REDIS", "redis://127.0.0.1:6379")
BROKER_DB, LIVE_DB = os.environ.get("AIMESH_BENCH_DBS", "2,3").split(",")
PG_SERVER = "postgresql://postgres@127.0.0.1:5432"
PG_ADMIN = f"{PG_SERVER}/postgres"
DATABASE_NAME = ("aimesh_bench" if "AIMESH_BENCH_DBS" not in os.environ
                 else f"aimesh_bench_{BROKER_DB}_{LIVE_DB}")
BENCH_DB = f"{PG_SERVER}/{DATABASE_NAME}"
BROKER = os.environ.get("AIMESH_BENCH_BROKER", "redis")
RABBITMQ = os.environ.get("AIMESH_BENCH_RABBITMQ", "amqp://guest:guest@127.0.0.1:5672")
VHOST = f"aimesh_bench_{BROKER_DB}_{LIVE_DB}"
if BROKER not in ("redis", "rabbitmq"):
    raise SystemExit(f"AIMESH_BENCH_BROKER: must be redis or rabbitmq, got {BROKER!r}")
ENV = {
    "AIMESH_BROKER_URL": f"{RABBITMQ}/{VHOST}" if BROKER == "rabbitmq" else f"{REDIS}/{BROKER_DB}",
    "AIMESH_RESULT_BACKEND": f"{REDIS}/{BROKER_DB}",
    "AIMESH_REDIS_URL": f"{REDIS}/{LIVE_DB}",
    "AIMESH_DATABASE_URL": BENCH_DB,
}
os.environ.update(ENV)


def create_database() -> None:
    """Create the benchmark database if it is missing (not migrated: see upgrade())."""
    import psycopg

    with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
        if not conn.execute("SELECT 1 FROM pg_database WHERE datname = %s",
                            (DATABASE_NAME,)).fetchone():
            conn.execute(f'CREATE DATABASE "{DATABASE_NAME}"')


def prepare_broker() -> None:
    """On RabbitMQ, make this benchmark's vhost exist and be empty (rabbitmqctl)."""
    import subprocess

    if BROKER != "rabbitmq":
        return
    subprocess.run(["rabbitmqctl", "delete_vhost", VHOST], capture_output=True, timeout=120)
    for args in (["add_vhost", VHOST], ["set_permissions", "-p", VHOST, "guest", ".*", ".*",
                                        ".*"]):
        subprocess.run(["rabbitmqctl", *args], capture_output=True, timeout=120, check=True)
