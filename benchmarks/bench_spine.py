"""Spine vs raw Celery two-hop, same broker, backend, workers and pools, same run.

    python benchmarks/bench_spine.py [--messages 1500] [--repeats 3]
        [--router-pool threads] [--endpoint-pool threads] [--concurrency 16]
        [--endpoint-concurrency N] [--latency-ms 0] [--metered]

Starts the simulator (0 ms latency) and two worker processes: a router worker on
aimesh.route + bench.a and an endpoint worker on the endpoint queue + bench.b. Measures
(a) raw two-hop burst throughput, (b) spine burst throughput, (c) per-message latency
at a paced 50 msg/s for both (publish → result written, from timestamps on one clock).
The raw two-hop hands off the way the spine does (same task id, see
aimesh_tasks/tasks/handoff.py); a raw two-hop with Celery's Task.replace is measured
too, for reference (raw_replace_msgs_s), and a raw two-hop whose second hop makes the
same HTTP call to the simulator (raw_call_msgs_s, and its paced p50): the fair baseline,
since the spine's endpoint worker makes that call too (issue 18, goal 1).
With --metered the agent has a budget (so every call is reserved, claimed and settled
in Postgres); without, it is unmetered and a call touches no database. Settings reach
the workers from the environment (e.g. AIMESH_DURABLE_ANSWERS=false).
AIMESH_BENCH_BROKER=rabbitmq runs both on RabbitMQ (benchmarks/places.py; quorum queues
unless AIMESH_RABBIT_QUEUE_TYPE says classic), so that the brokers compare side by side.
Prints one JSON line last. Needs Redis and Postgres on loopback (Redis dbs 2/3 and the
Postgres database aimesh_bench, created if missing; AIMESH_BENCH_DBS moves both, see
benchmarks/places.py).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
import uuid
from datetime import datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# Redis dbs and the Postgres database by AIMESH_BENCH_DBS (benchmarks/places.py).
from benchmarks.places import BENCH_DB, BROKER, BROKER_DB, ENV, LIVE_DB, REDIS, create_database, prepare_broker  # noqa: E402, I001, E501

import redis  # noqa: E402

from aimesh_tasks import submit  # noqa: E402
from aimesh_tasks.app import app  # noqa: E402
from aimesh_tasks.db.migrate import upgrade  # noqa: E402
from aimesh_tasks.registry import add_endpoint, list_endpoints, remove_endpoint  # noqa: E402
from benchmarks.procfs import free_port as _free_port  # noqa: E402
from benchmarks.raw_tasks import hop_a, hop_a_call, hop_a_replace  # noqa: E402

BIN = Path(sys.executable).parent


def prepare_database() -> None:
    """Create and migrate the benchmark database; empty its Redis dbs."""
    create_database()
    upgrade(BENCH_DB)
    prepare_broker()
    for db in (BROKER_DB, LIVE_DB):
        redis.Redis.from_url(f"{REDIS}/{db}").flushdb()
    for endpoint in list_endpoints():
        remove_endpoint(endpoint.id)


def meter(metered: bool) -> None:
    """Give the benchmark agent a budget no run exhausts, or none (a budget left by an
    earlier run is removed)."""
    import psycopg

    from aimesh_tasks.budgets import set_budget
    from aimesh_tasks.errors import InvalidInput
    from aimesh_tasks.governance import add_agent

    with psycopg.connect(BENCH_DB, autocommit=True) as conn:
        conn.execute("DELETE FROM budgets WHERE agent_id = 'bench'")
    if not metered:
        return
    try:
        add_agent("bench")
    except InvalidInput:  # registered by an earlier run
        pass
    set_budget("bench", usd="1000000")


def start(cmd: list[str], log: str) -> subprocess.Popen[bytes]:
    """Start a subprocess with the benchmark environment, output to a log file."""
    return subprocess.Popen(cmd, env={**os.environ, **ENV}, stdout=open(log, "w"),
                            stderr=subprocess.STDOUT, cwd=ROOT, start_new_session=True)


def stop_all(procs: list[subprocess.Popen[bytes]]) -> None:
    """SIGTERM each process, then SIGKILL what has not exited after 30 s."""
    for proc in procs:
        proc.terminate()
    for proc in procs:
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


def wait_workers(names: list[str]) -> None:
    """Wait until every named worker answers a ping."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        replies = app.control.ping(timeout=0.5) or []
        seen = {name for reply in replies for name in reply}
        if all(any(s.startswith(n) for s in seen) for n in names):
            return
    raise RuntimeError(f"workers {names} did not start; see /tmp/bench-*.log")


SIMULATOR_URL = ""  # set by main() once the simulator listens


def burst(kind: str, n: int) -> float:
    """Messages per second for n messages published at once, until the last result."""
    started = time.perf_counter()
    results = [publish(kind, i) for i in range(n)]
    for result in results:
        result.get(timeout=300)
    return n / (time.perf_counter() - started)


def publish(kind: str, i: int) -> Any:
    """Publish one message of the kind ('raw' or 'spine')."""
    if kind == "raw":
        return hop_a.apply_async(({"published_at": time.time(), "i": i},), queue="bench.a")
    if kind == "raw_call":
        return hop_a_call.apply_async(({"published_at": time.time(), "i": i,
                                        "url": SIMULATOR_URL},), queue="bench.a")
    if kind == "raw_replace":
        return hop_a_replace.apply_async(({"published_at": time.time(), "i": i},),
                                         queue="bench.a")
    # A fresh prompt every time: the spine is measured on cache misses (the dedup check
    # included), never answered from the result cache.
    return submit(agent_id="bench", prompt=f"benchmark message {i} {uuid.uuid4().hex}",
                  max_tokens=16)


def paced_latencies_ms(kind: str, rate: float, seconds: float) -> list[float]:
    """Publish at `rate` msgs/s; latency from publish to the worker finishing, in ms."""
    results = []
    interval = 1.0 / rate
    next_at = time.perf_counter()
    for i in range(int(rate * seconds)):
        time.sleep(max(0.0, next_at - time.perf_counter()))
        results.append((time.time(), publish(kind, i)))
        next_at += interval
    latencies = []
    for published, result in results:
        value = result.get(timeout=120)
        if kind in ("raw", "raw_call"):
            finished = value["finished_at"]
        else:
            finished = datetime.fromisoformat(value["finished_at"]).timestamp()
        latencies.append((finished - published) * 1000)
    return latencies


def percentile(values: list[float], q: float) -> float:
    """The q-quantile (0..1) by nearest rank."""
    ordered = sorted(values)
    return ordered[max(0, min(len(ordered) - 1, int(round(q * len(ordered) + 0.5)) - 1))]


def main() -> None:
    """Run the comparison and print the figures, JSON last."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--messages", type=int, default=1500)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--router-pool", default="threads")
    parser.add_argument("--endpoint-pool", default="threads")
    parser.add_argument("--concurrency", type=int, default=16, help="router worker")
    parser.add_argument("--endpoint-concurrency", type=int, default=None)
    parser.add_argument("--latency-ms", type=float, default=0.0, help="simulator latency")
    parser.add_argument("--paced-seconds", type=float, default=8.0)
    parser.add_argument("--metered", action="store_true",
                        help="give the agent a budget: every call reserved and settled")
    args = parser.parse_args()

    global SIMULATOR_URL
    prepare_database()
    port = _free_port()
    SIMULATOR_URL = f"http://127.0.0.1:{port}"
    sim = start([str(BIN / "aimesh"), "simulate", "--port", str(port), "--latency-ms",
                 str(args.latency_ms)], "/tmp/bench-sim.log")
    time.sleep(1.0)
    endpoint = add_endpoint(id="sim", base_url=f"http://127.0.0.1:{port}", model="sim",
                            input_usd_per_1k="0.001", output_usd_per_1k="0.002", capacity=10000)
    meter(args.metered)
    tag = f"{os.getpid()}"
    workers = [
        start([str(BIN / "aimesh"), "worker", "-n", f"brouter{tag}@%h", "-Q", "bench.a",
               "--router", "-P", args.router_pool, "-c", str(args.concurrency), "-l", "WARNING",
               "--include", "benchmarks.raw_tasks"], "/tmp/bench-router.log"),
        start([str(BIN / "aimesh"), "worker", "-n", f"bendpoint{tag}@%h", "-Q", "bench.b",
               "--endpoints", endpoint.id, "-P", args.endpoint_pool, "-c",
               str(args.endpoint_concurrency or args.concurrency), "-l", "WARNING",
               "--include", "benchmarks.raw_tasks"],
              "/tmp/bench-endpoint.log"),
    ]
    try:
        wait_workers([f"brouter{tag}", f"bendpoint{tag}"])
        burst("raw", 100)
        burst("raw_call", 100)
        burst("spine", 100)  # warm-up: connections, caches
        raw, raw_call, spine, raw_replace = [], [], [], []
        for _ in range(args.repeats):
            raw.append(burst("raw", args.messages))
            raw_call.append(burst("raw_call", args.messages))
            spine.append(burst("spine", args.messages))
            raw_replace.append(burst("raw_replace", args.messages))
            print(f"burst: raw {raw[-1]:.0f} msgs/s, raw with the call {raw_call[-1]:.0f}, "
                  f"spine {spine[-1]:.0f} msgs/s, raw with Task.replace "
                  f"{raw_replace[-1]:.0f} msgs/s", flush=True)
        raw_lat = paced_latencies_ms("raw", 50, args.paced_seconds)
        raw_call_lat = paced_latencies_ms("raw_call", 50, args.paced_seconds)
        spine_lat = paced_latencies_ms("spine", 50, args.paced_seconds)
    finally:
        stop_all([*workers, sim])
    raw_tp, spine_tp = statistics.median(raw), statistics.median(spine)
    raw_p50, spine_p50 = percentile(raw_lat, 0.5), percentile(spine_lat, 0.5)
    raw_call_tp, raw_call_p50 = statistics.median(raw_call), percentile(raw_call_lat, 0.5)
    figures = {
        "raw_call_msgs_s": round(raw_call_tp, 1),
        "ratio_to_raw_call": round(spine_tp / raw_call_tp, 3),
        "raw_call_p50_ms": round(raw_call_p50, 2),
        "p50_ratio_to_raw_call": round(spine_p50 / raw_call_p50, 3),
        "raw_two_hop_msgs_s": round(raw_tp, 1),
        "spine_msgs_s": round(spine_tp, 1),
        "ratio": round(spine_tp / raw_tp, 3),
        "raw_p50_ms": round(raw_p50, 2),
        "spine_p50_ms": round(spine_p50, 2),
        "added_p50_ms": round(spine_p50 - raw_p50, 2),
        "spine_p99_ms": round(percentile(spine_lat, 0.99), 2),
        "raw_p99_ms": round(percentile(raw_lat, 0.99), 2),
        "raw_replace_msgs_s": round(statistics.median(raw_replace), 1),
        "ratio_to_raw_replace": round(spine_tp / statistics.median(raw_replace), 3),
        "broker": BROKER,
        "router_pool": args.router_pool,
        "endpoint_pool": args.endpoint_pool,
        "concurrency": args.concurrency,
        "endpoint_concurrency": args.endpoint_concurrency or args.concurrency,
        "latency_ms": args.latency_ms,
        "metered": args.metered,
        "durable_answers": os.environ.get("AIMESH_DURABLE_ANSWERS", "true"),
        "messages": args.messages,
        "repeats": args.repeats,
    }
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
