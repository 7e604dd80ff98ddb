"""Retry policy and circuit breaker vs fallback-only, same run, same simulator.

    python benchmarks/bench_resilience.py [--messages 200] [--rate 20]

Each setup starts its own worker processes (a threads router worker and a prefork
endpoint worker) with the resilience settings under test, registers fresh endpoints on
in-process simulators, sends `--messages` distinct messages paced at `--rate` per second,
and reads every result (submit → result, from the result's own timestamps):

| scenario | endpoints                                            | measures                |
|----------|------------------------------------------------------|-------------------------|
| single   | one endpoint, 30 % of its calls a 503 (Retry-After 0) | success rate, latency   |
| pair     | that endpoint (cheaper, tried first) and a good one  | success, added latency, |
|          |                                                      | calls that reached it   |

Setups: `fallback_only` (AIMESH_RETRY_MAX_ATTEMPTS=0, AIMESH_BREAKER_ENABLED=false: the
path before this work) and `retry_breaker` (the defaults: two retries with full-jitter
backoff, the breaker on). Hedged requests are not built; the bimodal-latency hedging
comparison of issue 14 is therefore not measured here.

Prints one JSON line last. Needs Redis and Postgres (AIMESH_BENCH_REDIS, default
redis://127.0.0.1:6379, dbs AIMESH_BENCH_DBS, default "4,5"; AIMESH_BENCH_POSTGRES,
default postgresql://postgres@127.0.0.1:5432, database aimesh_bench_resilience).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

REDIS = os.environ.get("AIMESH_BENCH_REDIS", "redis://127.0.0.1:6379")
BROKER_DB, LIVE_DB = os.environ.get("AIMESH_BENCH_DBS", "4,5").split(",")
PG = os.environ.get("AIMESH_BENCH_POSTGRES", "postgresql://postgres@127.0.0.1:5432")
PG_ADMIN = f"{PG}/postgres"
BENCH_DB = f"{PG}/aimesh_bench_resilience"
ENV = {
    "AIMESH_BROKER_URL": f"{REDIS}/{BROKER_DB}",
    "AIMESH_RESULT_BACKEND": f"{REDIS}/{BROKER_DB}",
    "AIMESH_REDIS_URL": f"{REDIS}/{LIVE_DB}",
    "AIMESH_DATABASE_URL": BENCH_DB,
    "AIMESH_ACCEPTED_LOG": "false",
}
os.environ.update(ENV)
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import psycopg  # noqa: E402
import redis  # noqa: E402

from aimesh_tasks import submit  # noqa: E402
from aimesh_tasks.app import app  # noqa: E402
from aimesh_tasks.db.migrate import upgrade  # noqa: E402
from aimesh_tasks.errors import AimeshError  # noqa: E402
from aimesh_tasks.registry import add_endpoint, list_endpoints, remove_endpoint  # noqa: E402
from aimesh_tasks.simulator import SimulatorConfig, start_simulator  # noqa: E402

BIN = Path(sys.executable).parent
SETUPS: dict[str, dict[str, str]] = {
    "fallback_only": {"AIMESH_RETRY_MAX_ATTEMPTS": "0", "AIMESH_BREAKER_ENABLED": "false"},
    "retry_breaker": {},
}
FAILING = {"overload_rate": 0.3, "retry_after_s": 0, "latency_ms": 50.0, "seed": 7}
GOOD = {"latency_ms": 50.0}


def prepare() -> None:
    """Create and migrate the benchmark database; empty its Redis dbs and registry."""
    with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
        if not conn.execute("SELECT 1 FROM pg_database WHERE datname = "
                            "'aimesh_bench_resilience'").fetchone():
            conn.execute("CREATE DATABASE aimesh_bench_resilience")
    upgrade(BENCH_DB)
    for db in (BROKER_DB, LIVE_DB):
        redis.Redis.from_url(f"{REDIS}/{db}").flushdb()
    for endpoint in list_endpoints():
        remove_endpoint(endpoint.id)


def start_workers(setup: str) -> list[subprocess.Popen[bytes]]:
    """A router and an endpoint worker with the setup's settings; waits for both."""
    env = {**os.environ, **ENV, **SETUPS[setup]}
    tag = uuid.uuid4().hex[:6]
    specs = [(f"bench-router-{tag}", [str(BIN / "celery"), "-A", "aimesh_tasks.app", "worker",
                                      "-Q", "aimesh.route", "-P", "threads", "-c", "8"]),
             (f"bench-endpoints-{tag}", [str(BIN / "aimesh"), "worker", "--endpoints", "all",
                                         "-P", "prefork", "-c", "4"])]
    procs = [subprocess.Popen([*cmd, "-n", f"{name}@%h", "-l", "WARNING"], env=env,
                              stdout=open(f"/tmp/{name}.log", "w"), stderr=subprocess.STDOUT,
                              cwd=ROOT, start_new_session=True) for name, cmd in specs]
    names = [name for name, _ in specs]
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        seen = {n for reply in app.control.ping(timeout=0.5) or [] for n in reply}
        if all(any(s.startswith(n) for s in seen) for n in names):
            return procs
    raise RuntimeError(f"workers {names} did not start; see /tmp/bench-*.log")


def stop_workers(procs: list[subprocess.Popen[bytes]]) -> None:
    for proc in procs:
        proc.terminate()
    for proc in procs:
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()


def percentile(values: list[float], q: float) -> float | None:
    """The q-quantile (0..1) of `values`, nearest rank; None when empty."""
    if not values:
        return None
    ordered = sorted(values)
    return round(ordered[min(len(ordered) - 1, max(0, int(q * len(ordered) + 0.5) - 1))], 1)


def run(scenario: str, setup: str, messages: int, rate: float) -> dict[str, Any]:
    """One scenario under one setup, on fresh simulators and endpoints."""
    failing = start_simulator(SimulatorConfig(**FAILING))  # type: ignore[arg-type]
    good = start_simulator(SimulatorConfig(**GOOD))  # type: ignore[arg-type]
    tag = uuid.uuid4().hex[:6]
    add_endpoint(id=f"flaky-{tag}", base_url=failing.url, model="sim-model",
                 input_usd_per_1k="0.001", output_usd_per_1k="0.001")
    if scenario == "pair":
        add_endpoint(id=f"good-{tag}", base_url=good.url, model="sim-model",
                     input_usd_per_1k="0.002", output_usd_per_1k="0.002")
    procs = start_workers(setup)
    try:
        time.sleep(2.0)  # the endpoint worker follows the new endpoint queues
        pending = []
        for n in range(messages):
            pending.append(submit(agent_id="bench-resilience", max_tokens=16,
                                  prompt=f"{scenario} {setup} {tag} {n}", no_cache=True))
            time.sleep(1.0 / rate)
        latencies, extra_calls, failed = [], 0, 0
        for each in pending:
            try:
                result = each.get(timeout=120)
            except AimeshError:
                failed += 1
                continue
            latencies.append(float(result["processing_ms"]) + float(result["queue_wait_ms"]))
            extra_calls += len(result["attempts"]) - 1
        return {
            "success_rate": round(1 - failed / messages, 4),
            "p50_ms": percentile(latencies, 0.5), "p99_ms": percentile(latencies, 0.99),
            "mean_ms": round(statistics.fmean(latencies), 1) if latencies else None,
            "extra_calls_per_message": round(extra_calls / max(len(latencies), 1), 3),
            "calls_at_failing_endpoint": failing.stats()["calls"],
        }
    finally:
        stop_workers(procs)
        failing.stop()
        good.stop()
        for endpoint in list_endpoints():
            remove_endpoint(endpoint.id)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=200)
    parser.add_argument("--rate", type=float, default=20.0, help="messages per second")
    args = parser.parse_args()
    prepare()
    figures: dict[str, Any] = {}
    for scenario in ("single", "pair"):
        for setup in SETUPS:
            figures[f"{scenario}.{setup}"] = run(scenario, setup, args.messages, args.rate)
            print(f"{scenario}.{setup}: {figures[f'{scenario}.{setup}']}", flush=True)
    single_gain = (figures["single.retry_breaker"]["success_rate"]
                   - figures["single.fallback_only"]["success_rate"])
    print(json.dumps({
        "bench": "resilience", "messages": args.messages, "rate_per_s": args.rate,
        "failing_endpoint": FAILING, "python": platform.python_version(),
        "cpus": os.cpu_count(), "figures": figures,
        "single_success_gain": round(single_gain, 4),
        "hedging": "not built (design note: aimesh_tasks/resilience/__init__.py)",
    }))


if __name__ == "__main__":
    main()
