"""Slow providers do not slow the path: a thousand calls in flight per endpoint worker
process (issue 18, goal 3).

    python benchmarks/bench_inflight.py [--messages 3000] [--repeats 3] [--latency-ms 5000]
        [--endpoint-concurrency 1000] [--baseline-concurrency 64] [--router-concurrency 2]

Starts the simulator in its own process, a router worker (prefork -c2) and ONE endpoint
worker process (threads -c1000: the deployed shape), for a metered agent (a budget
reserve, claim and settle on every message). Each repeat measures, in this order (after
the `held` phase below):

1. `spine_0ms`: a burst of --messages through the spine at 0 ms latency, msgs/s;
2. `spine_slow`: the same burst at --latency-ms: msgs/s, its ratio to (1) (goal >= 0.9),
   and the most calls the simulator saw in flight at once, all from the one endpoint
   process. A burst can at best take (1)'s time plus one latency, so `ideal_ratio` is
   t_0ms / (t_0ms + latency): what a path that slow calls cost nothing would score;
3. `drain`: the burst routed while the endpoint worker does not consume its queue
   (cancelled), then consumed at once, at --latency-ms: the most calls in flight it
   reaches on its own (its start rate times the latency), and its CPU per call; then
   `baseline`: the same with a second endpoint worker process on threads
   --baseline-concurrency (the old deployed -c64) consuming instead, for the CPU a
   thousand threads cost per call;
4. `plain`: a plain aiohttp client in its own process making as many calls, as many at
   once, at the same latency: its CPU per call, the I/O floor of this box.

First, once, `held`: --endpoint-concurrency messages whose answers the simulator holds
until that many wait at once (so the endpoint process holds them all, however slowly
they arrive; goal >= 1,000), the process's RSS while it holds them (per 1,000 in flight:
goal <= 150 MB; `rss_added_mb_per_1000` counts what it grew by over idle), all answered
at once, and the Redis and Postgres connections the process opened by then (its pools
keep what the busiest moment needed: aimesh_tasks/pools.py).

Medians over the repeats; load averages at start and end (the machine is shared). Needs
Redis and Postgres on loopback (AIMESH_BENCH_DBS picks the dbs: benchmarks/places.py).
Prints one JSON line last.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# A held call waits at the simulator until the last of a thousand arrives: the workers'
# read timeout and time limits far above that (before aimesh_tasks reads its settings).
os.environ.update({"AIMESH_PROVIDER_TIMEOUT_S": "900", "AIMESH_TASK_SOFT_TIME_LIMIT_S": "1000",
                   "AIMESH_TASK_TIME_LIMIT_S": "1100", "AIMESH_VISIBILITY_TIMEOUT_S": "1800",
                   "AIMESH_RESERVATION_TIMEOUT_S": "3600"})

from benchmarks.bench_spine import (  # noqa: E402, I001
    BIN,
    _free_port,
    prepare_database,
    start,
    stop_all,
    wait_workers,
)
from benchmarks.nodes import (  # noqa: E402
    BRPOP_DRAIN_S,
    Worker,
    set_consumers,
    start_worker,
    wait_queued,
)
from benchmarks.procfs import connections_to, rss_mb, tree_cpu_s  # noqa: E402
from benchmarks.servers import Simulator  # noqa: E402

from aimesh_tasks import submit  # noqa: E402
from aimesh_tasks.keys import endpoint_queue  # noqa: E402

AGENT = "inflight"
SAMPLE_S = 0.2
PLAIN_CLIENT = r'''
import asyncio, json, sys, time
import aiohttp

url, n, concurrency = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])

async def main():
    gate = asyncio.Semaphore(concurrency)
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector) as session:
        async def one(i):
            body = {"model": "sim", "max_tokens": 16,
                    "messages": [{"role": "user", "content": f"plain message {i}"}]}
            async with gate:
                async with session.post(url + "/v1/chat/completions", json=body) as response:
                    answer = await response.json()
                    assert response.status == 200, answer
        cpu, wall = time.process_time(), time.perf_counter()
        await asyncio.gather(*(one(i) for i in range(n)))
        print(json.dumps({"cpu_ms_per_call": (time.process_time() - cpu) * 1000 / n,
                          "req_s": n / (time.perf_counter() - wall)}))

asyncio.run(main())
'''


@contextmanager
def peak_rss(pid: int) -> Iterator[Callable[[], float]]:
    """Sample the RSS of `pid` every SAMPLE_S while the block runs; yields the peak so far."""
    peak = [rss_mb(pid)]
    done = threading.Event()

    def sample() -> None:
        while not done.wait(SAMPLE_S):
            peak[0] = max(peak[0], rss_mb(pid))

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        yield lambda: peak[0]
    finally:
        done.set()
        sampler.join()


def publish(n: int, label: str) -> list[Any]:
    """n messages of the metered agent, fresh prompts (cache misses)."""
    return [submit(agent_id=AGENT, prompt=f"{label} {i} {uuid.uuid4().hex}", max_tokens=16)
            for i in range(n)]


def wait_results(results: list[Any]) -> None:
    for result in results:
        result.get(timeout=900)


def burst(n: int, label: str) -> float:
    """Seconds for n messages published at once, until the last result."""
    started = time.perf_counter()
    wait_results(publish(n, label))
    return time.perf_counter() - started


@dataclass(frozen=True)
class Rig:
    """What a measurement works on: the simulator, the endpoint's queue, the endpoint
    worker under test and the baseline one (the old -c64), each consuming it in turn."""

    sim: Simulator
    queue: str
    main: Worker
    baseline: Worker | None

    def consumed_by(self, worker: Worker | None) -> None:
        """Make `worker` (None: no one) the only consumer of the queue."""
        set_consumers(self.queue, [worker] if worker is not None else [],
                      [w for w in (self.main, self.baseline) if w is not None])

    def backlog(self, n: int, label: str) -> list[Any]:
        """n messages routed and waiting in the queue, which no one consumes."""
        self.consumed_by(None)
        results = publish(n, label)
        wait_queued(self.queue, n)
        return results


def drain(rig: Rig, worker: Worker, n: int) -> dict[str, float]:
    """A backlog of n messages consumed by `worker` alone: its CPU per call, the most
    calls in flight, its peak RSS and the wall time of the drain."""
    results = rig.backlog(n, "drain")
    rig.sim.reset()
    cpu = tree_cpu_s(worker.pid)
    with peak_rss(worker.pid) as peak:
        started = time.perf_counter()
        rig.consumed_by(worker)
        wait_results(results)
        wall = time.perf_counter() - started - BRPOP_DRAIN_S
        rss = peak()
    return {"cpu_ms_per_call": (tree_cpu_s(worker.pid) - cpu) * 1000 / n,
            "max_in_flight": rig.sim.in_flight()["max_in_flight"], "peak_rss_mb": rss,
            "calls_s": n / wall}


def plain_client(url: str, n: int, concurrency: int) -> dict[str, float]:
    """A plain aiohttp client's CPU per call and req/s, in its own process."""
    done = subprocess.run([sys.executable, "-c", PLAIN_CLIENT, url, str(n), str(concurrency)],
                          capture_output=True, text=True, timeout=900, check=True)
    figures: dict[str, float] = json.loads(done.stdout.strip().splitlines()[-1])
    return figures


def held(rig: Rig, n: int) -> dict[str, float]:
    """A backlog of n messages consumed by the main worker with the simulator holding
    every answer until all n wait there (see the module notes): RSS and connections while
    held, then all answered at once."""
    results = rig.backlog(n, "held")
    rig.sim.configure(latency_ms=0, hold_in_flight=n + 1)  # never reached: opened below
    rig.sim.reset()
    rig.consumed_by(rig.main)
    deadline = time.monotonic() + 900
    while (waiting := rig.sim.in_flight()["in_flight"]) < n:
        if time.monotonic() > deadline:
            raise RuntimeError(f"only {waiting} of {n} calls reached the simulator")
        time.sleep(0.5)
    time.sleep(2 * SAMPLE_S)  # every thread is parked on its call now
    pid = rig.main.pid
    rss, redis_held = rss_mb(pid), connections_to(pid, 6379)
    started = time.perf_counter()
    rig.sim.configure(hold_in_flight=0)  # the hold opens: every answer at once
    wait_results(results)
    return {"held_in_flight": rig.sim.in_flight()["max_in_flight"], "held_rss_mb": rss,
            "answered_at_once_s": time.perf_counter() - started,
            "redis_connections_held": redis_held, "redis_connections": connections_to(pid, 6379),
            "postgres_connections": connections_to(pid, 5432)}


def setup_agent() -> None:
    from aimesh_tasks.budgets import set_budget
    from aimesh_tasks.errors import InvalidInput
    from aimesh_tasks.governance.agents import add_agent

    try:
        add_agent(AGENT)
    except InvalidInput:  # registered by an earlier run
        pass
    set_budget(AGENT, usd="1000000")


def one_repeat(args: argparse.Namespace, rig: Rig) -> dict[str, float]:
    """The measurements of one repeat (see the module notes)."""
    n, latency_s, sim = args.messages, args.latency_ms / 1000, rig.sim
    sim.configure(latency_ms=0)
    t0 = burst(n, "fast")
    sim.configure(latency_ms=args.latency_ms)
    sim.reset()
    cpu = tree_cpu_s(rig.main.pid)
    t_slow = burst(n, "slow")
    row = {"spine_0ms_msgs_s": n / t0, "spine_slow_msgs_s": n / t_slow, "ratio": t0 / t_slow,
           "ideal_ratio": t0 / (t0 + latency_s),
           "slow_max_in_flight": sim.in_flight()["max_in_flight"],
           "slow_cpu_ms_per_call": (tree_cpu_s(rig.main.pid) - cpu) * 1000 / n}
    row.update({f"drain_{k}": v for k, v in drain(rig, rig.main, n).items()})
    if rig.baseline is not None:
        row.update({f"baseline_{k}": v for k, v in drain(rig, rig.baseline, n).items()})
    rig.consumed_by(rig.main)
    plain = plain_client(sim.url, n, args.endpoint_concurrency)
    row.update({"plain_cpu_ms_per_call": plain["cpu_ms_per_call"], "plain_req_s": plain["req_s"],
                "cpu_ratio_to_plain": row["drain_cpu_ms_per_call"] / plain["cpu_ms_per_call"]})
    print(" ".join(f"{k}={v:.2f}" for k, v in row.items()), flush=True)
    return row


def main() -> None:
    """Measure and print; JSON last."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--messages", type=int, default=3000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--latency-ms", type=float, default=5000)
    parser.add_argument("--endpoint-concurrency", type=int, default=1000)
    parser.add_argument("--baseline-concurrency", type=int, default=64,
                        help="a second endpoint worker's threads, drained in turn; 0 = none")
    parser.add_argument("--router-concurrency", type=int, default=2)
    args = parser.parse_args()
    load_before = os.getloadavg()
    prepare_database()
    setup_agent()
    from aimesh_tasks.registry import add_endpoint

    port = _free_port()
    procs = [start([str(BIN / "aimesh"), "simulate", "--port", str(port)],
                   "/tmp/bench-inflight-sim.log")]
    try:
        sim = Simulator(f"http://127.0.0.1:{port}", "/tmp/bench-inflight-sim.log")
        sim.wait_up()
        endpoint = add_endpoint(id="sim", base_url=sim.url, model="sim",
                                input_usd_per_1k="0.001", output_usd_per_1k="0.002",
                                capacity=100_000)
        tag = f"inflight{os.getpid()}"
        procs.append(start([str(BIN / "aimesh"), "worker", "-n", f"brouter{tag}@%h",
                            "--router", "-P", "prefork", "-c", str(args.router_concurrency),
                            "-l", "WARNING"], "/tmp/bench-inflight-router.log"))
        main_worker, proc = start_worker(
            f"bendpoint{tag}", ["--endpoints", endpoint.id, "-P", "threads", "-c",
                                str(args.endpoint_concurrency)],
            "/tmp/bench-inflight-endpoint.log")
        procs.append(proc)
        baseline = None
        if args.baseline_concurrency:  # consumes nothing until its drain
            baseline, proc = start_worker(
                f"bbaseline{tag}", ["-Q", f"bench.idle.{tag}", "-P", "threads", "-c",
                                    str(args.baseline_concurrency)],
                "/tmp/bench-inflight-baseline.log")
            procs.append(proc)
        wait_workers([f"brouter{tag}", f"bendpoint{tag}"] + ([f"bbaseline{tag}"] if baseline
                                                              else []))
        rig = Rig(sim, endpoint_queue(endpoint.id), main_worker, baseline)
        burst(100, "warm-up")
        idle_rss = rss_mb(main_worker.pid)
        holding = held(rig, args.endpoint_concurrency)  # first: RSS over idle, nothing else
        rows = [one_repeat(args, rig) for _ in range(args.repeats)]
    finally:
        stop_all(procs)
    print(json.dumps(summary(args, rows, holding, idle_rss, load_before)))


def summary(args: argparse.Namespace, rows: list[dict[str, float]], holding: dict[str, float],
            idle_rss: float, load_before: tuple[float, float, float]) -> dict[str, Any]:
    """Medians of the repeats, the held phase, and what the run was."""
    figures: dict[str, Any] = {k: round(statistics.median(r[k] for r in rows), 3)
                               for k in rows[0]}
    figures.update({k: round(v, 3) for k, v in holding.items()})
    in_flight = max(holding["held_in_flight"], 1)
    figures.update({
        "idle_rss_mb": round(idle_rss, 1),
        "rss_mb_per_1000": round(holding["held_rss_mb"] * 1000 / in_flight, 1),
        "rss_added_mb_per_1000": round((holding["held_rss_mb"] - idle_rss) * 1000 / in_flight,
                                       1),
        "messages": args.messages, "repeats": args.repeats, "latency_ms": args.latency_ms,
        "endpoint_pool": f"threads -c{args.endpoint_concurrency}",
        "baseline_pool": f"threads -c{args.baseline_concurrency}",
        "router_pool": f"prefork -c{args.router_concurrency}", "metered": True,
        "load_before": [round(v, 2) for v in load_before],
        "load_after": [round(v, 2) for v in os.getloadavg()],
    })
    return figures


if __name__ == "__main__":
    main()
