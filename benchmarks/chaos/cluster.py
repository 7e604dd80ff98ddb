"""The cluster a chaos run owns: its Redis, its Postgres, and per row fresh simulators,
relays, endpoints, metered agents and worker subprocesses.

The process driving the run must point its AIMESH_* settings at this cluster before
anything reads them: `process_env()` gives the variables, the chaos script sets them
first thing. A row may change worker settings (`Cluster.start_row(env=...)`); the
workers are restarted for every row, so no row inherits another's state.
"""

from __future__ import annotations

import os
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmarks.chaos.relay import Holds, Relay
from benchmarks.chaos.servers import PostgresServer, RedisServer, Worker, wait_for

AGENTS = ("chaos-a", "chaos-b", "chaos-c")
VICTIM = "chaos-victim"  # the agent whose messages a row kills at a phase
WORKFLOW_AGENT = "chaos-flow"
BUDGET_USD = "1000"
# Time limits small enough that a redelivery, and the reaper, happen within a row:
# visibility timeout > hard limit (the start-up check), reservation timeout >
# visibility timeout + hard limit (a reservation is never reaped before its redelivery).
WORKER_ENV = {
    "AIMESH_TASK_SOFT_TIME_LIMIT_S": "20",
    "AIMESH_TASK_TIME_LIMIT_S": "25",
    "AIMESH_VISIBILITY_TIMEOUT_S": "30",
    "AIMESH_RESERVATION_TIMEOUT_S": "60",
    "AIMESH_REAPER_INTERVAL_S": "5",
    "AIMESH_PROVIDER_TIMEOUT_S": "15",
    "AIMESH_FOLLOW_INTERVAL_S": "0.5",
    "AIMESH_HEALTH_RETRY_S": "5",
    "AIMESH_RETRY_MAX_DELAY_S": "10",  # at most half the visibility timeout (start-up check)
    # The reconciler (delivery/reconciler.py) re-publishes quiet accepted messages in a row.
    "AIMESH_REPUBLISH_AFTER_S": "40",
    "AIMESH_RECONCILE_INTERVAL_S": "5",
    "AIMESH_LOG_LEVEL": "WARNING",
}


def process_env(redis_port: int, postgres_port: int) -> dict[str, str]:
    """The AIMESH_* variables of the driving process and its workers."""
    redis_url = f"redis://127.0.0.1:{redis_port}"
    return {
        "AIMESH_BROKER_URL": f"{redis_url}/0",
        "AIMESH_RESULT_BACKEND": f"{redis_url}/0",
        "AIMESH_REDIS_URL": f"{redis_url}/1",
        "AIMESH_DATABASE_URL": f"postgresql://postgres@127.0.0.1:{postgres_port}/chaos",
        **WORKER_ENV,
    }


@dataclass
class Endpoints:
    """A row's endpoints: id -> (simulator, relay in front of it)."""

    sims: dict[str, Any] = field(default_factory=dict)
    relays: dict[str, Relay] = field(default_factory=dict)

    def logs(self) -> dict[str, list[dict[str, Any]]]:
        """Each endpoint's simulator call log."""
        return {endpoint_id: sim.calls() for endpoint_id, sim in self.sims.items()}

    def in_flight(self) -> int:
        """Requests the simulators have begun and not yet answered."""
        return sum(sim.stats()["calls"] - len(sim.calls()) for sim in self.sims.values())

    def answered(self) -> int:
        """Requests the simulators have answered."""
        return sum(len(sim.calls()) for sim in self.sims.values())


class Cluster:
    """Own Redis and Postgres for a run; per row: endpoints, agents and workers."""

    def __init__(self, workdir: Path, redis_port: int, postgres_port: int) -> None:
        self.workdir = workdir
        self.redis = RedisServer(redis_port, workdir, aof=True)
        self.postgres = PostgresServer(postgres_port, workdir)
        self.env = {**os.environ, **process_env(redis_port, postgres_port),
                    "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
        self.workers: list[Worker] = []
        self.endpoints = Endpoints()
        self.holds = Holds()
        self.supervised: list[str] = []  # what the supervisor did, for the row's notes
        self.left_dead: set[str] = set()  # workers that exited 0 (not restarted)

    def start(self) -> None:
        """Start Redis and Postgres and migrate the database."""
        from aimesh_tasks.db.migrate import upgrade

        self.redis.start()
        self.postgres.init()
        upgrade(self.postgres.url)

    def stop(self) -> None:
        """Stop the row's workers, then the servers; delete their files."""
        self.end_row()
        self.redis.stop()
        self.postgres.destroy()

    # --- a row's parts -----------------------------------------------------------------

    def start_row(self, *, aof: bool, sims: dict[str, dict[str, Any]],
                  workers: dict[str, list[str]], env: dict[str, str]) -> None:
        """Empty state, then endpoints (a simulator + relay each, configured by `sims`:
        {name: simulator fields + 'price_in'/'price_out'}), agents with budgets, and the
        workers ({name: argv, first word 'celery' for the plain Celery command})."""
        from aimesh_tasks.simulator import SimulatorConfig, start_simulator

        self._reset(aof)
        self.holds = Holds()
        for name, config in sims.items():
            prices: dict[str, str] = {k: str(config.pop(k)) for k in ("price_in", "price_out")
                                      if k in config}
            sim = start_simulator(SimulatorConfig(**config))
            relay = Relay(sim.url, self.holds)
            endpoint_id = self._register(name, relay.url, prices)
            self.endpoints.sims[endpoint_id] = sim
            self.endpoints.relays[endpoint_id] = relay
        self._agents()
        row_env = {**self.env, **env}
        tag = uuid.uuid4().hex[:4]
        self.workers = [Worker(f"chaos-{name}-{tag}", argv, row_env, self.workdir)
                        for name, argv in workers.items()]
        for worker in self.workers:
            worker.start()
        for worker in self.workers:
            self.wait_ready(worker)

    def _reset(self, aof: bool) -> None:
        import redis
        from sqlalchemy import text

        from aimesh_tasks.db import Base, dispose_engines, get_engine
        from aimesh_tasks.registry.cache import ENDPOINTS

        if self.redis.aof != aof:
            self.redis.stop()
            self.redis.aof = aof
            self.redis.wipe()
            self.redis.start()
        redis.Redis(port=self.redis.port).flushall()
        dispose_engines()
        names = ", ".join(t.name for t in Base.metadata.sorted_tables)
        with get_engine().begin() as connection:
            connection.execute(text(f"TRUNCATE {names}"))
        ENDPOINTS.clear()
        self.supervised, self.left_dead = [], set()

    def _register(self, name: str, url: str, prices: dict[str, str]) -> str:
        from aimesh_tasks.registry import add_endpoint

        endpoint = add_endpoint(id=f"{name}-{uuid.uuid4().hex[:6]}", base_url=url,
                                model="sim-model", capacity=1000,
                                input_usd_per_1k=prices.get("price_in", "0.001"),
                                output_usd_per_1k=prices.get("price_out", "0.002"))
        return endpoint.id

    def _agents(self) -> None:
        from aimesh_tasks.budgets import set_budget
        from aimesh_tasks.governance import add_agent

        for agent in (*AGENTS, VICTIM, WORKFLOW_AGENT):
            add_agent(agent)
            set_budget(agent, usd=BUDGET_USD)

    def wait_ready(self, worker: Worker, bound_s: float = 90) -> None:
        """Wait until `worker` answers a ping; RuntimeError with its log if it exits."""
        from aimesh_tasks.app import app

        def ready() -> bool:
            if not worker.alive():
                raise RuntimeError(f"worker {worker.name} exited: {worker.log_tail()}")
            try:
                return bool(app.control.ping(destination=[worker.hostname], timeout=0.5))
            except Exception:  # the broker is away: not ready yet
                time.sleep(0.5)
                return False

        wait_for(ready, f"worker {worker.name} to answer a ping", bound_s)

    def worker(self, name: str) -> Worker:
        """The row's worker started as `name`."""
        return next(w for w in self.workers if w.name.startswith(f"chaos-{name}-"))

    def supervise(self) -> None:
        """What a supervisor with `restart: on-failure` does: a worker that exited with
        a non-zero status is started again; one that exited 0 is left dead."""
        for worker in self.workers:
            if worker.proc is None or worker.alive() or worker.name in self.left_dead:
                continue
            status = worker.wait_exit(5)
            if status == 0:
                self.supervised.append(f"{worker.name} exited 0: left dead")
                self.left_dead.add(worker.name)
                continue
            self.supervised.append(f"{worker.name} exited {status}: restarted")
            worker.start()

    def end_row(self) -> None:
        """Stop the row's workers, relays and simulators."""
        for worker in self.workers:
            worker.stop()
        self.holds.close()
        for relay in self.endpoints.relays.values():
            relay.close()
        for sim in self.endpoints.sims.values():
            sim.stop()
        self.workers, self.endpoints = [], Endpoints()
