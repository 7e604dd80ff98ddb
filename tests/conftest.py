"""Fixtures on real parts: Redis, Postgres, Celery worker subprocesses, the simulator.

The broker and result backend use Redis db 14 (flushed once per session, before the
workers start); live figures use db 15 (flushed around every test); the database is
Postgres `test`, migrated from empty once per session and truncated around every test.
AIMESH_TEST_SLOT=N (1..7) moves a run to dbs 14-2N/15-2N and database aimesh_test_N,
so that several runs can share one machine (slots 8 and up wrap round the 16 Redis dbs:
give them their own redis-server with AIMESH_TEST_REDIS). AIMESH_TEST_REDIS and AIMESH_TEST_POSTGRES
point the run at other servers (e.g. a closed port, to show which tests need none).

Only tests that use Redis or Postgres depend on the `servers` fixture (through `database`,
`clean`, `workers`, or directly); pure unit tests run with both servers stopped.

The broker matrix: AIMESH_TEST_BROKER=rabbitmq runs the session on RabbitMQ at
127.0.0.1:5672 (AIMESH_TEST_RABBITMQ moves it) in a vhost of its own per slot,
aimesh_matrix_N, created empty at the start and deleted at the end; results stay in
Redis. Tests marked `broker` (the spine, budgets, dedup and workflow tests chosen to
stand for the broker-dependent ones) run in both sessions, tests marked `rabbitmq` only
in the RabbitMQ one, every other test only in the Redis one:
    AIMESH_TEST_BROKER=rabbitmq python -m pytest -m "broker or rabbitmq"
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest

SLOT = int(os.environ.get("AIMESH_TEST_SLOT", "0"))
REDIS = os.environ.get("AIMESH_TEST_REDIS", "redis://127.0.0.1:6379")
BROKER_DB, LIVE_DB = (14 - 2 * SLOT) % 16, (15 - 2 * SLOT) % 16
PG_SERVER = os.environ.get("AIMESH_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432")
DATABASE = f"{PG_SERVER}/test" if SLOT == 0 else f"{PG_SERVER}/aimesh_test_{SLOT}"
BROKER = os.environ.get("AIMESH_TEST_BROKER", "redis")
RABBITMQ = os.environ.get("AIMESH_TEST_RABBITMQ", "amqp://guest:guest@127.0.0.1:5672")
MATRIX_VHOST = f"aimesh_matrix_{SLOT}"
BROKER_URL = f"{RABBITMQ}/{MATRIX_VHOST}" if BROKER == "rabbitmq" else f"{REDIS}/{BROKER_DB}"
TEST_ENV = {
    "AIMESH_BROKER_URL": BROKER_URL,
    "AIMESH_RESULT_BACKEND": f"{REDIS}/{BROKER_DB}",
    "AIMESH_REDIS_URL": f"{REDIS}/{LIVE_DB}",
    "AIMESH_DATABASE_URL": DATABASE,
    "AIMESH_FOLLOW_INTERVAL_S": "0.2",
    "AIMESH_HEALTH_RETRY_S": "30",
    # Upstream URLs may reach this host's loopback address only: the simulators and gates
    # tests start listen on 127.0.0.1 (aimesh_tasks/registry/url_policy.py).
    "AIMESH_UPSTREAM_ALLOW_PRIVATE": "127.0.0.1/32",
    # Self-registered endpoints (tests/test_self_register.py): a quick heartbeat and bound.
    "AIMESH_SERVE_HEARTBEAT_S": "0.2",
    "AIMESH_SERVE_DOWN_AFTER_S": "1.5",
    # The semantic cache is on for these two agents only (tests/test_dedup.py).
    "AIMESH_SEMANTIC_AGENTS": "semantic-agent,semantic-other",
    # Budget and workflow kill tests pause these agents' messages at one point each
    # (aimesh_tasks.failpoints) until the test SIGKILLs the paused process; the bound only
    # ends a pause nobody killed.
    "AIMESH_FAILPOINTS": ("after_reserve@kill-after-reserve=120,"
                          "before_settle@kill-before-settle=120,"
                          "after_record@wf-kill-record=120"),
}
os.environ.update(TEST_ENV)  # before aimesh_tasks reads its settings

import redis  # noqa: E402
from alembic.util.exc import CommandError  # noqa: E402
from sqlalchemy import create_engine, text  # noqa: E402
from sqlalchemy.exc import SQLAlchemyError  # noqa: E402

from aimesh_tasks.db import dispose_engines  # noqa: E402
from aimesh_tasks.db.migrate import downgrade, upgrade  # noqa: E402
from aimesh_tasks.registry import Endpoint, add_endpoint  # noqa: E402
from aimesh_tasks.registry.cache import ENDPOINTS  # noqa: E402
from aimesh_tasks.settings import reset_settings  # noqa: E402
from aimesh_tasks.simulator import RunningSimulator, SimulatorConfig, start_simulator  # noqa: E402
from tests.gate import Gate  # noqa: E402
from tests.processes import WorkerProcess, start_workers  # noqa: E402
from tests.tables import empty_tables  # noqa: E402


def _require_servers() -> None:
    try:
        redis.Redis.from_url(REDIS, socket_connect_timeout=2).ping()
    except redis.RedisError as exc:
        pytest.exit(
            f"Redis is not reachable at {REDIS} ({exc}). Start it with: redis-server "
            '--daemonize yes --bind 127.0.0.1 --port 6379 --save "" --appendonly no',
            returncode=3,
        )
    try:
        admin = create_engine(f"{PG_SERVER}/postgres".replace("postgresql://",
                                                              "postgresql+psycopg://"),
                              isolation_level="AUTOCOMMIT")
        with admin.connect() as connection:
            name = DATABASE.rsplit("/", 1)[1]
            exists = connection.execute(text("SELECT 1 FROM pg_database WHERE datname = :n"),
                                        {"n": name}).first()
            if not exists:
                connection.execute(text(f'CREATE DATABASE "{name}"'))
        admin.dispose()
    except Exception as exc:
        pytest.exit(
            f"PostgreSQL is not reachable at {DATABASE} ({type(exc).__name__}). Start it with: "
            "pg_ctlcluster --skip-systemctl-redirect $(ls /etc/postgresql) main start",
            returncode=3,
        )


def pytest_configure(config: pytest.Config) -> None:
    if BROKER not in ("redis", "rabbitmq"):
        raise pytest.UsageError(f"AIMESH_TEST_BROKER: must be redis or rabbitmq, got {BROKER!r}")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Skip what the other broker's session runs (see the module docstring)."""
    for item in items:
        marks = {m.name for m in item.iter_markers()}
        if BROKER == "redis" and "rabbitmq" in marks:
            item.add_marker(pytest.mark.skip(
                reason='RabbitMQ only: AIMESH_TEST_BROKER=rabbitmq pytest -m "broker or rabbitmq"'))
        elif BROKER == "rabbitmq" and not marks & {"broker", "rabbitmq"}:
            item.add_marker(pytest.mark.skip(reason="runs in the Redis session only"))


def rabbitmqctl(*args: str, check: bool = True) -> None:
    """Run rabbitmqctl on the local node; fail the test naming the command if it fails."""
    import shutil
    import subprocess

    if shutil.which("rabbitmqctl") is None:
        pytest.exit("rabbitmqctl is not installed: the RabbitMQ tests need RabbitMQ at "
                    "127.0.0.1:5672 (e.g. `rabbitmq-server -detached`)", returncode=3)
    done = subprocess.run(["rabbitmqctl", *args], capture_output=True, text=True, timeout=120)
    if check and done.returncode != 0 and "already_exists" not in done.stdout + done.stderr:
        pytest.fail(f"rabbitmqctl {' '.join(args)} failed: {done.stderr[-500:]}. RabbitMQ "
                    "must run at 127.0.0.1:5672 (e.g. `rabbitmq-server -detached`)")


def _require_rabbitmq() -> None:
    import socket
    from urllib.parse import urlsplit

    where = urlsplit(RABBITMQ)
    try:
        socket.create_connection((where.hostname, where.port or 5672), timeout=2).close()
    except OSError as exc:
        pytest.exit(f"RabbitMQ is not reachable at {where.hostname}:{where.port or 5672} "
                    f"({exc}); AIMESH_TEST_BROKER=rabbitmq needs it. Start it with: "
                    "rabbitmq-server -detached", returncode=3)


@pytest.fixture(autouse=True)
def _restore_environ() -> Iterator[None]:
    """Undo what a test put in os.environ (an in-process CLI command sets AIMESH_LOG_LEVEL:
    cli.shell.quiet_embedded_logs), so workers started later get the test settings only."""
    saved = dict(os.environ)
    yield
    if os.environ != saved:
        os.environ.clear()
        os.environ.update(saved)
        reset_settings()


@pytest.fixture(scope="session")
def servers() -> Iterator[None]:
    """Real Redis and Postgres (and RabbitMQ in its session, with this slot's vhost made
    empty), or the session stops with the command that starts them. Every fixture that
    touches one depends on this one; pure tests do not."""
    _require_servers()
    if BROKER != "rabbitmq":
        yield
        return
    _require_rabbitmq()
    rabbitmqctl("delete_vhost", MATRIX_VHOST, check=False)
    rabbitmqctl("add_vhost", MATRIX_VHOST)
    rabbitmqctl("set_permissions", "-p", MATRIX_VHOST, "guest", ".*", ".*", ".*")
    yield
    rabbitmqctl("delete_vhost", MATRIX_VHOST, check=False)


@pytest.fixture(scope="session")
def database(servers: None) -> Iterator[str]:
    """The Postgres test database, migrated from empty. A database left at a revision this
    tree does not have (another branch's run), or half-way through one, cannot be
    downgraded: it is emptied instead."""
    try:
        downgrade(DATABASE, "base")
    except (CommandError, SQLAlchemyError):  # an unknown or half-applied revision
        _empty_database()
    upgrade(DATABASE)
    yield DATABASE
    dispose_engines()


def _empty_database() -> None:
    engine = create_engine(DATABASE.replace("postgresql://", "postgresql+psycopg://"),
                           isolation_level="AUTOCOMMIT")
    with engine.connect() as connection:
        connection.execute(text("DROP SCHEMA public CASCADE"))
        connection.execute(text("CREATE SCHEMA public"))
    engine.dispose()


def _reset_state() -> None:
    from aimesh_tasks.db import get_engine

    empty_tables(get_engine())
    redis.Redis.from_url(f"{REDIS}/{LIVE_DB}").flushdb()
    ENDPOINTS.clear()


@pytest.fixture()
def clean(database: str) -> Iterator[None]:
    """Empty tables and live figures before and after the test."""
    _reset_state()
    yield
    _reset_state()


@pytest.fixture(scope="session")
def workers(database: str) -> Iterator[list[WorkerProcess]]:
    """A router worker (plain `celery worker`) and an endpoint worker (`aimesh worker`)
    that follows the registry; both prefork, so a test can SIGKILL one child process."""
    redis.Redis.from_url(f"{REDIS}/{BROKER_DB}").flushdb()
    started = start_workers([
        (f"router-{uuid.uuid4().hex[:6]}",
         ["celery", "-Q", "aimesh.route", "-P", "prefork", "-c", "4"]),
        (f"endpoints-{uuid.uuid4().hex[:6]}", ["--endpoints", "all", "-P", "prefork", "-c", "3"]),
    ])
    yield started
    for worker in started:
        worker.stop()


@pytest.fixture()
def simulator() -> Iterator[Callable[..., RunningSimulator]]:
    """Start simulated providers on 127.0.0.1 (any number), stopped after the test."""
    running: list[RunningSimulator] = []

    def start(**config: Any) -> RunningSimulator:
        sim = start_simulator(SimulatorConfig(**config))
        running.append(sim)
        return sim

    yield start
    for sim in running:
        sim.stop()


@pytest.fixture()
def gate() -> Iterator[Callable[[RunningSimulator], Gate]]:
    """Put a gate (tests/gate.py) in front of a simulator: gate(sim); closed after the test."""
    made: list[Gate] = []

    def make(sim: RunningSimulator) -> Gate:
        made.append(Gate(sim.url))
        return made[-1]

    yield make
    for each in made:
        each.close()


@pytest.fixture()
def endpoint(clean: None) -> Callable[..., Endpoint]:
    """Register an endpoint with a unique id: endpoint(sim, 'cheap', input=..., output=...)."""

    def make(sim: RunningSimulator | Gate, name: str, *, price_in: str = "0.001",
             price_out: str = "0.002", **fields: Any) -> Endpoint:
        return add_endpoint(
            id=f"{name}-{uuid.uuid4().hex[:6]}",
            base_url=sim.url,
            model=fields.pop("model", "sim-model"),
            input_usd_per_1k=price_in,
            output_usd_per_1k=price_out,
            **fields,
        )

    return make
