"""What one message costs each shared server, for the capacity model (issue 18, goal 6).

    python benchmarks/bench_capacity.py [--messages 1000] [--repeats 3]

Runs bursts of metered messages (fresh prompts: cache misses, budget reserve/claim/settle,
dedup, audit, the accepted log) through the spine with its own redis-server on a free port
(so no other client's traffic is counted) and the Postgres database of bench_spine.py, and
reports per message, medians over the repeats:
- CPU ms of each process type: router worker, endpoint worker, the producer (submit() and
  result waits), the simulator, Redis itself (from /proc and INFO cpu) and the Postgres
  server (its postmaster's process tree: every backend of every database, so other
  databases must be idle; left out when the server is not on this machine);
- Redis commands (INFO commandstats), reads (INFO stats total_reads_processed: about one
  per client round trip), bytes in and out (INFO stats) and keys left behind;
- Postgres transactions and rows inserted/updated/deleted (pg_stat_database of the
  benchmark database).
From those figures deploy/README.md's capacity model says where one Redis, one Postgres
and one broker stop. Prints one JSON line last.
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
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks.procfs import free_port, postmaster_pid, tree_cpu_s  # noqa: E402  (no side effects)

REDIS_PORT = free_port()
os.environ["AIMESH_BENCH_REDIS"] = f"redis://127.0.0.1:{REDIS_PORT}"
os.environ.setdefault("AIMESH_BENCH_DBS", "2,3")

import psycopg  # noqa: E402

from benchmarks.bench_spine import (  # noqa: E402
    BIN,
    prepare_database,
    start,
    stop_all,
    wait_workers,
)
from benchmarks.places import BENCH_DB, DATABASE_NAME  # noqa: E402
from benchmarks.servers import pg_figures, redis_figures, redis_server  # noqa: E402


def run_burst(n: int) -> None:
    """n metered messages published at once, waiting for every result."""
    from aimesh_tasks import submit

    results = [submit(agent_id="capacity", prompt=f"capacity message {i} {uuid.uuid4().hex}",
                      max_tokens=16) for i in range(n)]
    for result in results:
        result.get(timeout=600)


def main() -> None:
    """Measure and print; JSON last."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--messages", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--monitor", type=Path, default=None,
                        help="write Redis MONITOR output of the first burst to this file")
    args = parser.parse_args()

    procs: list[subprocess.Popen[bytes]] = []
    with redis_server(REDIS_PORT) as (client, _):
        try:
            pids = start_processes(args, procs)
            run_burst(100)  # warm-up
            time.sleep(1.0)  # the outbox flushers' last batch of the warm-up
            measured = [one_repeat(args, client, pids, first=not i)
                        for i in range(args.repeats)]
            keys_left = sum(int(v["keys"]) for k, v in client.info("keyspace").items())
        finally:
            stop_all(procs)
    rows, top = [row for row, _ in measured], [by_name for _, by_name in measured]
    figures: dict[str, Any] = {k: round(statistics.median(r[k] for r in rows), 3)
                               for k in rows[0]}
    per_command = {name: round(statistics.median(t.get(name, 0.0) for t in top), 2)
                   for name in top[-1]}
    figures["redis_top_commands"] = dict(sorted(per_command.items(),
                                                key=lambda kv: -kv[1])[:12])
    figures.update({"redis_keys_after": keys_left, "messages": args.messages,
                    "repeats": args.repeats, "pools": "threads", "concurrency": args.concurrency})
    print(json.dumps(figures))


def start_processes(args: argparse.Namespace, procs: list[subprocess.Popen[bytes]]
                    ) -> dict[str, int]:
    """The simulator, the endpoint and the agent, a router and an endpoint worker (each
    process into `procs`, as it starts): their pids by role."""
    prepare_database()
    from aimesh_tasks.budgets import set_budget
    from aimesh_tasks.errors import InvalidInput
    from aimesh_tasks.governance.agents import add_agent
    from aimesh_tasks.registry import add_endpoint

    port = free_port()
    sim = start([str(BIN / "aimesh"), "simulate", "--port", str(port), "--latency-ms",
                 "0"], "/tmp/bench-capacity-sim.log")
    procs.append(sim)
    time.sleep(1.0)
    endpoint = add_endpoint(id="sim", base_url=f"http://127.0.0.1:{port}", model="sim",
                            input_usd_per_1k="0.001", output_usd_per_1k="0.002",
                            capacity=10000)
    try:
        add_agent("capacity")
    except InvalidInput:  # registered by an earlier run
        pass
    set_budget("capacity", usd="1000000")
    tag = f"cap{os.getpid()}"
    router = start([str(BIN / "aimesh"), "worker", "-n", f"brouter{tag}@%h", "--router",
                    "-P", "threads", "-c", str(args.concurrency), "-l", "WARNING"],
                   "/tmp/bench-capacity-router.log")
    procs.append(router)
    endpoint_worker = start([str(BIN / "aimesh"), "worker", "-n", f"bendpoint{tag}@%h",
                             "--endpoints", endpoint.id, "-P", "threads", "-c",
                             str(args.concurrency), "-l", "WARNING"],
                            "/tmp/bench-capacity-endpoint.log")
    procs.append(endpoint_worker)
    wait_workers([f"brouter{tag}", f"bendpoint{tag}"])
    return {"router": router.pid, "endpoint": endpoint_worker.pid, "simulator": sim.pid}


def one_repeat(args: argparse.Namespace, client: Any, pids: dict[str, int], first: bool
               ) -> tuple[dict[str, float], dict[str, float]]:
    """One burst: its figures per message, and the Redis commands per message by name."""
    with psycopg.connect(BENCH_DB, autocommit=True) as pg:
        return _one_repeat(args, client, pg, pids, first)


def _one_repeat(args: argparse.Namespace, client: Any, pg: psycopg.Connection[Any],
                pids: dict[str, int], first: bool
                ) -> tuple[dict[str, float], dict[str, float]]:
    postmaster = postmaster_pid(pg)
    if postmaster is not None:
        pids = {**pids, "postgres": postmaster}
    cpu0 = {k: tree_cpu_s(p) for k, p in pids.items()}
    me0 = time.process_time()
    r0, p0 = redis_figures(client), pg_figures(pg, DATABASE_NAME)
    monitor = (subprocess.Popen(["redis-cli", "-p", str(REDIS_PORT), "monitor"],
                                stdout=args.monitor.open("w"))
               if args.monitor is not None and first else None)
    started = time.perf_counter()
    run_burst(args.messages)
    if monitor is not None:
        monitor.terminate()
        monitor.wait(10)
    wall = time.perf_counter() - started
    time.sleep(1.5)  # let the outbox flush what this burst wrote (counted, not timed)
    cpu1 = {k: tree_cpu_s(p) for k, p in pids.items()}
    r1, p1 = redis_figures(client), pg_figures(pg, DATABASE_NAME)
    n = args.messages
    row = {f"cpu_ms_{k}": (cpu1[k] - cpu0[k]) * 1000 / n for k in pids}
    row["cpu_ms_producer"] = (time.process_time() - me0) * 1000 / n
    row["cpu_ms_redis"] = (r1["cpu_s"] - r0["cpu_s"]) * 1000 / n
    row["redis_commands"] = (r1["commands"] - r0["commands"]) / n
    row["redis_reads"] = (r1["reads"] - r0["reads"]) / n  # about one per round trip
    row["redis_bytes_in"] = (r1["bytes_in"] - r0["bytes_in"]) / n
    row["redis_bytes_out"] = (r1["bytes_out"] - r0["bytes_out"]) / n
    for name in ("transactions", "rows_inserted", "rows_updated", "rows_deleted"):
        row[f"pg_{name}"] = (p1[name] - p0[name]) / n
    row["msgs_s"] = n / wall
    print(" ".join(f"{k}={v:.2f}" for k, v in row.items()), flush=True)
    return row, {name: (calls - r0["by_command"].get(name, 0)) / n
                 for name, calls in r1["by_command"].items()}


if __name__ == "__main__":
    main()
