"""Retry policy and circuit breaker vs fallback-only; hedged requests vs none; same run.

    python benchmarks/bench_resilience.py [--messages 200] [--rate 20]
        [--only single,pair,hedging] [--rounds 3] [--hedge-messages 400] [--hedge-rate 10]

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
backoff, the breaker on).

`hedging`: two equal endpoints whose simulators answer 95 % of calls in 100 ms and 5 % in
2 s (`slow_rate`, a roll per call), `--hedge-messages` distinct messages per round at
`--hedge-rate` per second after a warm-up of 100 unhedged ones (so the live p95
exists), each setup on its own workers (the endpoint worker a threads pool of 32),
`--rounds` rounds each on fresh endpoints:

| setup    | each message's hedge                | hedge budget                          |
|----------|-------------------------------------|---------------------------------------|
| none     | none                                | -                                     |
| p95      | {"after": "p95"}                    | the defaults: 10 % of calls, burst 10 |
| fixed150 | {"after_ms": 150}                   | the defaults                          |
| race     | {"after_ms": 0}                     | ratio 1, burst 1000 (a race is asked  |
|          |                                     | to double every call)                 |

Latency is submit to answer (the result's finished_at - submitted_at); extra calls are
the calls that reached the simulators beyond one per message. Per setup the medians of
the rounds' p50/p99/p99.9 and extra-call share; `p99_vs_none` divides by the none
setup's median p99, measured in the same run.

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
BIMODAL = {"latency_ms": 100.0, "slow_rate": 0.05, "slow_latency_ms": 2000.0}
HEDGES: dict[str, tuple[dict[str, Any] | None, dict[str, str]]] = {
    "none": (None, {}),
    "p95": ({"after": "p95"}, {}),
    "fixed150": ({"after_ms": 150}, {}),
    "race": ({"after_ms": 0}, {"AIMESH_HEDGE_BUDGET_RATIO": "1",
                               "AIMESH_HEDGE_BUDGET_BURST": "1000"}),
}
WARMUP_MESSAGES = 100
# A slow call holds its worker slot for 2 s: a threads endpoint worker (its calls on one
# asyncio loop, providers/aio.py) has the slots a prefork one of 4 would run out of.
HEDGING_POOL = ("threads", "32")


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


def start_workers(settings: dict[str, str], endpoint_pool: tuple[str, str] = ("prefork", "4")
                  ) -> list[subprocess.Popen[bytes]]:
    """A router and an endpoint worker (pool and concurrency `endpoint_pool`) with these
    settings; waits for both."""
    env = {**os.environ, **ENV, **settings}
    tag = uuid.uuid4().hex[:6]
    specs = [(f"bench-router-{tag}", [str(BIN / "celery"), "-A", "aimesh_tasks.app", "worker",
                                      "-Q", "aimesh.route", "-P", "threads", "-c", "8"]),
             (f"bench-endpoints-{tag}", [str(BIN / "aimesh"), "worker", "--endpoints", "all",
                                         "-P", endpoint_pool[0], "-c", endpoint_pool[1]])]
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
    procs = start_workers(SETUPS[setup])
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


def _send(count: int, rate: float, label: str, hedge: dict[str, Any] | None) -> list[Any]:
    pending = []
    extra = {"hedge": hedge} if hedge is not None else {}
    for n in range(count):
        pending.append(submit(agent_id="bench-hedging", max_tokens=16, no_cache=True,
                              prompt=f"{label} {n}", **extra))
        time.sleep(1.0 / rate)
    return pending


def _latency_ms(result: dict[str, Any]) -> float:
    return float(result["queue_wait_ms"]) + float(result["processing_ms"])


def hedging_round(setup: str, messages: int, rate: float, seed: int) -> dict[str, Any]:
    """One round of a hedging setup on fresh bimodal simulators and endpoints (the
    setup's workers are running)."""
    hedge = HEDGES[setup][0]
    sims = [start_simulator(SimulatorConfig(**BIMODAL, seed=seed + n))  # type: ignore[arg-type]
            for n in range(2)]
    tag = uuid.uuid4().hex[:6]
    try:
        for n, sim in enumerate(sims):
            add_endpoint(id=f"bimodal-{n}-{tag}", base_url=sim.url, model="sim-model",
                         input_usd_per_1k="0.001", output_usd_per_1k="0.001")
        time.sleep(2.0)  # the endpoint worker follows the new endpoint queues
        for each in _send(WARMUP_MESSAGES, rate, f"warm {setup} {tag}", None):
            each.get(timeout=120)
        warm_calls = sum(sim.stats()["calls"] for sim in sims)
        results = [each.get(timeout=120)
                   for each in _send(messages, rate, f"{setup} {tag}", hedge)]
        time.sleep(2.5)  # the last losers' calls end (aborted) before they are counted
        calls = sum(sim.stats()["calls"] for sim in sims) - warm_calls
        latencies = [_latency_ms(r) for r in results]
        return {"p50_ms": percentile(latencies, 0.5), "p99_ms": percentile(latencies, 0.99),
                "p999_ms": percentile(latencies, 0.999),
                "extra_calls_pct": round(100 * (calls - messages) / messages, 2),
                "disconnected": sum(sim.stats().get("disconnected", 0) for sim in sims)}
    finally:
        for sim in sims:
            sim.stop()
        for endpoint in list_endpoints():
            remove_endpoint(endpoint.id)


def hedging(rounds: int, messages: int, rate: float) -> dict[str, Any]:
    """Every hedging setup, `rounds` rounds each; medians of the rounds per figure."""
    figures: dict[str, Any] = {}
    for setup, (_hedge, settings) in HEDGES.items():
        redis.Redis.from_url(f"{REDIS}/{LIVE_DB}").flushdb()  # fresh hedge buckets
        procs = start_workers(settings, HEDGING_POOL)
        try:
            runs = [hedging_round(setup, messages, rate, seed=100 * n) for n in range(rounds)]
        finally:
            stop_workers(procs)
        figures[setup] = {name: statistics.median(r[name] for r in runs) for name in runs[0]}
        figures[setup]["rounds"] = runs
        print(f"hedging.{setup}: {figures[setup]}", flush=True)
    base = figures["none"]["p99_ms"]
    for setup in HEDGES:
        figures[setup]["p99_vs_none"] = round(figures[setup]["p99_ms"] / base, 3)
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=200)
    parser.add_argument("--rate", type=float, default=20.0, help="messages per second")
    parser.add_argument("--only", default="single,pair,hedging",
                        help="comma-separated parts: single, pair, hedging")
    parser.add_argument("--rounds", type=int, default=3, help="hedging rounds per setup")
    parser.add_argument("--hedge-messages", type=int, default=400)
    parser.add_argument("--hedge-rate", type=float, default=10.0, help="messages per second")
    args = parser.parse_args()
    parts = {p.strip() for p in args.only.split(",") if p.strip()}
    unknown = parts - {"single", "pair", "hedging"}
    if unknown:
        parser.error(f"--only: unknown part(s) {', '.join(sorted(unknown))}; "
                     "give single, pair or hedging")
    prepare()
    figures: dict[str, Any] = {}
    for scenario in ("single", "pair"):
        if scenario not in parts:
            continue
        for setup in SETUPS:
            figures[f"{scenario}.{setup}"] = run(scenario, setup, args.messages, args.rate)
            print(f"{scenario}.{setup}: {figures[f'{scenario}.{setup}']}", flush=True)
    report: dict[str, Any] = {
        "bench": "resilience", "parts": sorted(parts), "python": platform.python_version(),
        "cpus": os.cpu_count(), "figures": figures}
    if "single" in parts:
        report.update(messages=args.messages, rate_per_s=args.rate, failing_endpoint=FAILING,
                      single_success_gain=round(
                          figures["single.retry_breaker"]["success_rate"]
                          - figures["single.fallback_only"]["success_rate"], 4))
    if "hedging" in parts:
        report["hedging"] = {"simulator": BIMODAL, "rounds": args.rounds,
                             "messages": args.hedge_messages, "rate_per_s": args.hedge_rate,
                             "setups": hedging(args.rounds, args.hedge_messages,
                                               args.hedge_rate)}
    print(json.dumps(report))


if __name__ == "__main__":
    main()
