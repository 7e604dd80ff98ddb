"""Scaling out on one machine: one vs two endpoint worker processes on I/O-bound calls, one
vs two router processes on CPU-bound routing (issue 19, part 4).

    python benchmarks/bench_scale.py [--rounds 3] [--io-messages 300] [--cpu-messages 600]
        [--latency-ms 200] [--endpoint-concurrency 6] [--router-concurrency 8]
        [--router-pool threads] [--unmetered]

Starts a redis-server of its own (broker, results and live figures: only this benchmark's
traffic is counted), the simulator, two router worker processes and two endpoint worker
processes, all running throughout; each phase chooses which of them consume (Celery's
add_consumer / cancel_consumer). Each round measures every phase with one process, then
two (two, then one, on odd rounds, so that load drifting on the shared machine favours
neither):

1. `endpoints`: a burst of --io-messages at --latency-ms (200 ms) through both routers and
   one or two endpoint processes on threads -c --endpoint-concurrency. One process holds at
   most c calls in flight, so it is bound by its slots (c / latency msgs/s); a second
   process doubles them.
2. `routers`: a burst of --cpu-messages at 0 ms through one or two router processes and
   both endpoint processes: routing's CPU (~7 ms a message) is what one router process runs
   out of, its one core (threads pool: one interpreter lock).
3. `routing`: the same burst queued for routing while no worker consumes, then routed by one
   or two router processes with the endpoint workers off (timed until every message waits
   in the endpoint queue); the endpoint workers drain it afterwards, untimed. What routing
   alone scales to when it does not share the two cores with the calls.

For each: msgs/s, and the ratio two/one (goal >= 1.6 where the bottleneck allows). For each
phase and count, the split of its window: CPU cores used by each process (routers, endpoint
workers, Redis, the Postgres backends of the benchmark database, the simulator, this load
generator) and by everything else on the machine (`others`: the box may be shared), the box's
busy cores, Redis commands/s (INFO commandstats), Postgres transactions/s (pg_stat_database),
and `limit`: the resource nearest its ceiling, from `use_*` (the box's cores; one core for a
single-threaded process: Redis, the simulator, a threads-pool worker; calls in flight against
the endpoint slots). At the end, the Redis and Postgres connections each worker process holds.
Medians over the rounds; load averages before and after. Needs Postgres on loopback
(AIMESH_BENCH_DBS names its database: benchmarks/places.py) and redis-server on the PATH.
Prints one JSON line last.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks.procfs import (  # noqa: E402  (no side effects)
    connections_to,
    free_port,
    machine_cpu_s,
    tree_cpu_s,
    tree_pids,
)

REDIS_PORT = free_port()
os.environ["AIMESH_BENCH_REDIS"] = f"redis://127.0.0.1:{REDIS_PORT}"

# Redis dbs and the Postgres database (benchmarks/places.py), before aimesh_tasks.
from benchmarks.places import BENCH_DB, BROKER_DB, DATABASE_NAME, LIVE_DB  # noqa: E402, I001

import psycopg  # noqa: E402
import redis  # noqa: E402

from aimesh_tasks import submit  # noqa: E402
from aimesh_tasks.keys import ROUTE_QUEUE, endpoint_queue  # noqa: E402
from aimesh_tasks.observability.exporter import priority_lists  # noqa: E402
from benchmarks.bench_spine import (  # noqa: E402
    BIN,
    meter,
    prepare_database,
    start,
    stop_all,
    wait_workers,
)
from benchmarks.nodes import (  # noqa: E402
    BRPOP_DRAIN_S,
    Worker,
    add_consumers,
    cancel_consumers,
    start_worker,
    wait_queued,
)
from benchmarks.servers import (  # noqa: E402
    Simulator,
    backend_cpu_between,
    key_census,
    pg_figures,
    redis_figures,
    redis_server,
)

GOAL_RATIO = 1.6
PHASES = ("endpoints", "routers", "routing")
CPUS = os.cpu_count() or 1
PG_PORT = 5432
PG_STATS_LAG_S = 1.2  # a backend reports its transaction counts up to a second late
WARM_UP = 100


@dataclass(frozen=True)
class Rig:
    """What the phases steer and measure: the simulator, the shared Redis, the two router
    and two endpoint worker processes, the endpoint's queue, and how many cores one router
    process can use (1 on the threads pool, its -c on prefork)."""

    sim: Simulator
    sim_pid: int
    pg: psycopg.Connection[Any]  # for pg_stat_database and pg_stat_activity
    server: redis.Redis  # INFO is server-wide
    broker: redis.Redis  # its broker db
    redis_pid: int
    routers: tuple[Worker, ...]
    endpoints: tuple[Worker, ...]
    queue: str
    router_cores: int

    def consume(self, routers: int, endpoints: int) -> None:
        """The first `routers` router processes consume the routing queue and the first
        `endpoints` endpoint processes the endpoint queue; the others consume nothing."""
        cancel_consumers(ROUTE_QUEUE, self.routers[routers:])
        cancel_consumers(self.queue, self.endpoints[endpoints:])
        time.sleep(BRPOP_DRAIN_S)
        add_consumers(ROUTE_QUEUE, self.routers[:routers])
        add_consumers(self.queue, self.endpoints[:endpoints])

    def pids(self) -> dict[str, int]:
        """The processes whose CPU a phase splits, by name."""
        named = {f"router_{i + 1}": w.pid for i, w in enumerate(self.routers)}
        named.update({f"endpoint_{i + 1}": w.pid for i, w in enumerate(self.endpoints)})
        return {**named, "simulator": self.sim_pid, "redis": self.redis_pid}


@dataclass(frozen=True)
class Sample:
    """What the machine, the processes and Redis had done by one moment."""

    at_s: float
    busy_s: float
    total_s: float
    cpu_s: dict[str, float]
    load_generator_s: float
    redis_commands: int


def sample(rig: Rig) -> Sample:
    """The figures of `rig` now."""
    busy, total = machine_cpu_s()
    return Sample(time.perf_counter(), busy, total,
                  {name: tree_cpu_s(pid) for name, pid in rig.pids().items()},
                  time.process_time(), int(redis_figures(rig.server)["commands"]))


def measured(rig: Rig, n: int, run: Callable[[], None]) -> dict[str, float]:
    """Run `run` (n messages through) and split its window (see the module notes)."""
    pg0 = pg_figures(rig.pg, DATABASE_NAME)
    rig.sim.reset()
    before = sample(rig)
    run()
    after, pg_end = sample(rig), pg_figures(rig.pg, DATABASE_NAME)  # the backends' CPU
    time.sleep(PG_STATS_LAG_S)
    pg1 = pg_figures(rig.pg, DATABASE_NAME)  # their transactions, reported late
    wall = after.at_s - before.at_s
    cores = {name: (after.cpu_s[name] - before.cpu_s[name]) / wall for name in after.cpu_s}
    cores["postgres"] = backend_cpu_between(pg0, pg_end) / wall
    cores["load_generator"] = (after.load_generator_s - before.load_generator_s) / wall
    busy = (after.busy_s - before.busy_s) / (after.total_s - before.total_s) * CPUS
    cores["others"] = max(0.0, busy - sum(cores.values()))
    commands = after.redis_commands - before.redis_commands
    transactions = pg1["transactions"] - pg0["transactions"]
    row = {"msgs_s": n / wall, "box_busy_cores": busy,
           "redis_commands_s": commands / wall, "redis_commands_per_msg": commands / n,
           "pg_xact_s": transactions / wall, "pg_xact_per_msg": transactions / n,
           "sim_max_in_flight": rig.sim.in_flight()["max_in_flight"],
           **{f"cores_{name}": v for name, v in cores.items()}}
    row.update(uses(rig, row))
    return row


def uses(rig: Rig, row: dict[str, float]) -> dict[str, float]:
    """How near its ceiling each resource ran: the box's cores, and one core for each
    single-threaded process (a router on prefork: its -c cores)."""
    figures = {"use_box_cpu": row["box_busy_cores"] / CPUS, "use_redis": row["cores_redis"],
               "use_simulator": row["cores_simulator"]}
    for i in range(len(rig.routers)):
        figures[f"use_router_{i + 1}"] = row[f"cores_router_{i + 1}"] / rig.router_cores
    for i in range(len(rig.endpoints)):
        figures[f"use_endpoint_{i + 1}"] = row[f"cores_endpoint_{i + 1}"]
    return figures


def publish(n: int, label: str) -> list[Any]:
    """n messages of the benchmark agent, fresh prompts (cache misses)."""
    return [submit(agent_id="bench", prompt=f"{label} {i} {uuid.uuid4().hex}", max_tokens=16)
            for i in range(n)]


def wait_results(results: list[Any]) -> None:
    for result in results:
        result.get(timeout=900)


def endpoints_phase(rig: Rig, args: argparse.Namespace, count: int) -> dict[str, float]:
    """A burst at --latency-ms through both routers and `count` endpoint processes."""
    rig.consume(routers=len(rig.routers), endpoints=count)
    rig.sim.configure(latency_ms=args.latency_ms)
    n = args.io_messages
    row = measured(rig, n, lambda: wait_results(publish(n, "io")))
    slots = count * args.endpoint_concurrency
    row["use_endpoint_slots"] = row["msgs_s"] * args.latency_ms / 1000 / slots
    return row


def routers_phase(rig: Rig, args: argparse.Namespace, count: int) -> dict[str, float]:
    """A burst at 0 ms through `count` router processes and both endpoint processes."""
    rig.consume(routers=count, endpoints=len(rig.endpoints))
    rig.sim.configure(latency_ms=0)
    n = args.cpu_messages
    return measured(rig, n, lambda: wait_results(publish(n, "cpu")))


def routing_phase(rig: Rig, args: argparse.Namespace, count: int) -> dict[str, float]:
    """A queued burst routed by `count` router processes, no endpoint process consuming
    (timed), then drained by both (untimed)."""
    rig.consume(routers=0, endpoints=0)
    rig.sim.configure(latency_ms=0)
    n = args.cpu_messages
    results, row = published(rig, n)

    def route_all() -> None:
        add_consumers(ROUTE_QUEUE, rig.routers[:count])
        wait_queued(rig.queue, n, poll_s=0.05)

    row.update(measured(rig, n, route_all))
    add_consumers(rig.queue, rig.endpoints)
    wait_results(results)
    return row


def published(rig: Rig, n: int) -> tuple[list[Any], dict[str, float]]:
    """n messages published while no router consumes, and what the producer's side cost
    per message: its CPU, Redis commands, Postgres transactions, queued bytes."""
    pg0, before = pg_figures(rig.pg, DATABASE_NAME), sample(rig)
    results = publish(n, "routing")
    after = sample(rig)
    wait_queued(ROUTE_QUEUE, n)
    queued = sum(int(rig.broker.memory_usage(name, samples=0) or 0)
                 for name in priority_lists(ROUTE_QUEUE))
    time.sleep(PG_STATS_LAG_S)
    pg1 = pg_figures(rig.pg, DATABASE_NAME)
    return results, {
        "publish_cpu_ms_per_msg": (after.load_generator_s - before.load_generator_s) * 1000 / n,
        "publish_redis_commands_per_msg": (after.redis_commands - before.redis_commands) / n,
        "publish_pg_xact_per_msg": (pg1["transactions"] - pg0["transactions"]) / n,
        "redis_bytes_per_queued_msg": queued / n}


RUNS: dict[str, Callable[[Rig, argparse.Namespace, int], dict[str, float]]] = {
    "endpoints": endpoints_phase, "routers": routers_phase, "routing": routing_phase}


def one_round(rig: Rig, args: argparse.Namespace, number: int
              ) -> dict[str, dict[int, dict[str, float]]]:
    """Every phase with one process and with two (two first on odd rounds)."""
    counts = (1, 2) if number % 2 == 0 else (2, 1)
    rows: dict[str, dict[int, dict[str, float]]] = {}
    for phase in PHASES:
        rows[phase] = {}
        for count in counts:
            row = rows[phase][count] = RUNS[phase](rig, args, count)
            cores = " ".join(f"{k.removeprefix('cores_')}={v:.2f}" for k, v in row.items()
                             if k.startswith("cores_"))
            print(f"round {number + 1} {phase} x{count}: {row['msgs_s']:.1f} msgs/s, "
                  f"box {row['box_busy_cores']:.2f} cores busy, redis "
                  f"{row['redis_commands_s']:.0f} cmd/s, pg {row['pg_xact_s']:.0f} xact/s; "
                  f"cores {cores}", flush=True)
    return rows


def start_rig(args: argparse.Namespace, client: redis.Redis, redis_pid: int,
              procs: list[Any]) -> Rig:
    """The simulator, the endpoint, two router and two endpoint worker processes (each
    into `procs` as it starts), every worker consuming its queue."""
    from aimesh_tasks.registry import add_endpoint

    prepare_database()
    meter(not args.unmetered)
    port = free_port()
    log = "/tmp/bench-scale-sim.log"
    procs.append(start([str(BIN / "aimesh"), "simulate", "--port", str(port)], log))
    sim = Simulator(f"http://127.0.0.1:{port}", log)
    sim.wait_up()
    endpoint = add_endpoint(id="sim", base_url=sim.url, model="sim", input_usd_per_1k="0.001",
                            output_usd_per_1k="0.002", capacity=100_000)
    tag = f"bscale{os.getpid()}"
    routers, endpoints = [], []
    for i in (1, 2):
        worker, proc = start_worker(f"{tag}-router{i}", [
            "--router", "-P", args.router_pool, "-c", str(args.router_concurrency)],
            f"/tmp/bench-scale-router{i}.log")
        routers.append(worker)
        procs.append(proc)
        worker, proc = start_worker(f"{tag}-endpoint{i}", [
            "--endpoints", endpoint.id, "-P", "threads", "-c", str(args.endpoint_concurrency)],
            f"/tmp/bench-scale-endpoint{i}.log")
        endpoints.append(worker)
        procs.append(proc)
    wait_workers([w.node.split("@")[0] for w in (*routers, *endpoints)])
    broker = redis.Redis(port=REDIS_PORT, db=int(BROKER_DB))
    pg = psycopg.connect(BENCH_DB, autocommit=True)
    return Rig(sim, procs[0].pid, pg, client, broker, redis_pid, tuple(routers), tuple(endpoints),
               endpoint_queue(endpoint.id),
               1 if args.router_pool == "threads" else args.router_concurrency)


def connections(rig: Rig) -> dict[str, dict[str, int]]:
    """The Redis and Postgres connections each worker holds now (its pool processes'
    included, on prefork)."""
    return {name: {"redis": sum(connections_to(p, REDIS_PORT) for p in tree_pids(pid)),
                   "postgres": sum(connections_to(p, PG_PORT) for p in tree_pids(pid))}
            for name, pid in rig.pids().items() if name.startswith(("router", "endpoint"))}


def main() -> None:
    """Measure and print; JSON last."""
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--io-messages", type=int, default=300, help="endpoints phase burst")
    parser.add_argument("--cpu-messages", type=int, default=600,
                        help="routers and routing phases' burst")
    parser.add_argument("--latency-ms", type=float, default=200.0,
                        help="simulator latency in the endpoints phase")
    parser.add_argument("--endpoint-concurrency", type=int, default=6,
                        help="threads (calls in flight) per endpoint process")
    parser.add_argument("--router-concurrency", type=int, default=8)
    parser.add_argument("--router-pool", choices=("threads", "prefork"), default="threads")
    parser.add_argument("--unmetered", action="store_true",
                        help="no budget: no reservation or settlement in Postgres")
    args = parser.parse_args()
    for name in ("rounds", "io_messages", "cpu_messages", "endpoint_concurrency",
                 "router_concurrency"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')}: must be at least 1")
    load_before = os.getloadavg()
    procs: list[Any] = []
    with redis_server(REDIS_PORT) as (client, redis_pid):
        try:
            rig = start_rig(args, client, redis_pid, procs)
            memory = int(client.info("memory")["used_memory"])
            wait_results(publish(WARM_UP, "warm-up"))
            rounds = [one_round(rig, args, i) for i in range(args.rounds)]
            held = connections(rig)
            left = left_behind(args, int(client.info("memory")["used_memory"]) - memory)
            rig.pg.close()
        finally:
            stop_all(procs)
    print(json.dumps({**summary(args, rounds, held, load_before), **left}))


def left_behind(args: argparse.Namespace, memory_grown: int) -> dict[str, Any]:
    """What the run's messages left in Redis, per message: memory, and keys by pattern in
    the broker/results db and the live-figures db (results stay result_expires)."""
    n = WARM_UP + args.rounds * (2 * args.io_messages + 4 * args.cpu_messages)
    kept: dict[str, Any] = {"messages_total": n, "redis_retained_bytes_per_msg":
                            round(memory_grown / n, 1)}
    for name, db in (("broker_db", BROKER_DB), ("live_db", LIVE_DB)):
        census = key_census(redis.Redis(port=REDIS_PORT, db=int(db)))
        kept[f"redis_keys_{name}"] = {
            pattern: {"per_msg": round(c["keys"] / n, 3), "bytes_per_msg": round(c["bytes"] / n),
                      "ttl_s": c["ttl_s"]}
            for pattern, c in list(census.items())[:10]}
    return kept


def summary(args: argparse.Namespace, rounds: list[dict[str, dict[int, dict[str, float]]]],
            held: dict[str, dict[str, int]], load_before: tuple[float, ...]) -> dict[str, Any]:
    """Medians over the rounds: msgs/s and the ratio of each phase, the split of each."""
    figures: dict[str, Any] = {}
    split: dict[str, Any] = {}
    for phase in PHASES:
        for count, word in ((1, "one"), (2, "two")):
            rows = [r[phase][count] for r in rounds]
            median = {k: round(statistics.median(r[k] for r in rows), 3) for k in rows[0]}
            use = {k.removeprefix("use_"): v for k, v in median.items() if k.startswith("use_")}
            split[f"{phase}_{word}"] = {**median, "limit": max(use, key=lambda k: use[k])}
            figures[f"{phase}_{word}_msgs_s"] = median["msgs_s"]
        figures[f"{phase}_ratio"] = round(figures[f"{phase}_two_msgs_s"]
                                          / figures[f"{phase}_one_msgs_s"], 3)
    figures.update({
        "goal_ratio": GOAL_RATIO, "split": split, "connections": held, "box_cpus": CPUS,
        "rounds": args.rounds, "io_messages": args.io_messages,
        "cpu_messages": args.cpu_messages, "latency_ms": args.latency_ms,
        "endpoint_pool": f"threads -c{args.endpoint_concurrency}",
        "router_pool": f"{args.router_pool} -c{args.router_concurrency}",
        "metered": not args.unmetered,
        "load_before": [round(v, 2) for v in load_before],
        "load_after": [round(v, 2) for v in os.getloadavg()]})
    return figures


if __name__ == "__main__":
    main()
