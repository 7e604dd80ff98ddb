"""Cache hit vs miss at 200 ms provider latency, and the cost of the dedup check on a miss.

    python benchmarks/bench_dedup.py [--messages 40] [--repeats 3]

Starts the simulator (200 ms) and a router and an endpoint worker (threads). Misses:
distinct prompts sent one after another; hits: the same prompts again. Latency is
submit → result, p50 over the messages, median over the repeats. The check cost is the
join + finish Lua round trips for a new request key, timed in this process. JSON last.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
import uuid

from aimesh_tasks import submit  # noqa: I001  (after bench_spine set the environment)
from aimesh_tasks.dedup import cache
from aimesh_tasks.registry import add_endpoint
from benchmarks.bench_spine import (
    BIN,
    ENV,
    _free_port,
    percentile,
    prepare_database,
    start,
    stop_all,
)
from benchmarks.bench_spine import wait_workers as wait_for_workers


def timed_ms(prompts: list[str], agent: str) -> list[float]:
    """Submit each prompt, wait for it, and time it."""
    latencies = []
    for prompt in prompts:
        started = time.perf_counter()
        submit(agent_id=agent, prompt=prompt, max_tokens=32).get(timeout=60)
        latencies.append((time.perf_counter() - started) * 1000)
    return latencies


def check_cost_ms(samples: int = 2000) -> float:
    """p50 of join + finish for a request key nobody has asked for (a miss)."""
    costs = []
    for _ in range(samples):
        key = uuid.uuid4().hex
        started = time.perf_counter()
        joined = cache.join(key, {"task_id": key, "message": {}}, lease_s=60)
        cache.finish(key, joined.token or "", None, 60)
        costs.append((time.perf_counter() - started) * 1000)
    return float(statistics.median(costs))


def main() -> None:
    """Measure and print; JSON last."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--messages", type=int, default=40)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    prepare_database()
    port = _free_port()
    sim = start([str(BIN / "aimesh"), "simulate", "--port", str(port), "--latency-ms", "200"],
                "/tmp/bench-dedup-sim.log")
    time.sleep(1.0)
    add_endpoint(id="sim", base_url=f"http://127.0.0.1:{port}", model="sim",
                 input_usd_per_1k="0.001", output_usd_per_1k="0.002", capacity=10000)
    tag = uuid.uuid4().hex[:6]
    workers = [start([str(BIN / "aimesh"), "worker", "-n", f"drouter{tag}@%h", "--router",
                      "-P", "threads", "-c", "8", "-l", "WARNING"], "/tmp/bench-dedup-r.log"),
               start([str(BIN / "aimesh"), "worker", "-n", f"dendpoint{tag}@%h", "--endpoints",
                      "all", "-P", "threads", "-c", "32", "-l", "WARNING"],
                     "/tmp/bench-dedup-e.log")]
    try:
        wait_for_workers([f"drouter{tag}", f"dendpoint{tag}"])
        misses, hits = [], []
        for repeat in range(args.repeats):
            prompts = [f"question {repeat}-{n} {uuid.uuid4().hex}" for n in range(args.messages)]
            misses.append(percentile(timed_ms(prompts, "bench-dedup"), 0.5))
            hits.append(percentile(timed_ms(prompts, "bench-dedup"), 0.5))
            print(f"p50 miss {misses[-1]:.1f} ms, hit {hits[-1]:.1f} ms", flush=True)
        check = check_cost_ms()
    finally:
        stop_all([*workers, sim])
    miss, hit = statistics.median(misses), statistics.median(hits)
    print(json.dumps({"miss_p50_ms": round(miss, 2), "hit_p50_ms": round(hit, 2),
                      "hit_over_miss": round(hit / miss, 3), "check_p50_ms": round(check, 3),
                      "provider_latency_ms": 200, "messages": args.messages,
                      "repeats": args.repeats, "env": ENV["AIMESH_BROKER_URL"]}))


if __name__ == "__main__":
    main()
