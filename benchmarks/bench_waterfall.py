"""Where a paced message's time goes, step by step, from submit() to its result.

    python benchmarks/bench_waterfall.py [--rate 25] [--messages 300] [--unmetered]

Starts the simulator (0 ms) and the spine's two workers as bench_spine.py does (threads
-c16 both), with benchmarks/waterfall/ on the workers' path: its sitecustomize writes a
timestamp at each step of each message (task start and end, every Redis round trip, every
budget operation, the provider call, the hand-off publish, the result store). This
process times submit() and its accepted-log INSERT. Messages are published at `--rate`
(well under what the path sustains: each message crosses it alone), each a fresh prompt
(a cache miss), for a metered agent unless --unmetered.

Prints, for each step in the order they happen, the median time from submit() (ms) and
the median gap since the step before, then one JSON line: each step's median offset.
The path's p50 here is `finished_at` (the result's own clock, as bench_spine.py's paced
latency); what comes after it (the tail's round trip, the result store) is shown too.
A step the path skips for some messages (a retry, a second round trip) shows with the
count of messages that had it. Issue 18, goal 1: which steps the p50 is made of.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import statistics
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# bench_spine first: it puts the benchmark's places in os.environ before aimesh_tasks loads.
from benchmarks import bench_spine as spine  # noqa: E402, I001
from benchmarks.procfs import free_port  # noqa: E402
from aimesh_tasks.delivery import accepted  # noqa: E402
from aimesh_tasks.registry import add_endpoint  # noqa: E402

HOOKS = ROOT / "benchmarks" / "waterfall"


def _steps_of(folder: Path) -> dict[str, list[tuple[str, float]]]:
    """Every worker's steps, by task id."""
    steps: dict[str, list[tuple[str, float]]] = collections.defaultdict(list)
    for path in folder.glob("steps.*"):
        for line in path.read_text().splitlines():
            task_id, name, at = line.split(" ")
            steps[task_id].append((name, float(at)))
    return steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rate", type=float, default=25.0, help="messages per second")
    parser.add_argument("--messages", type=int, default=300)
    parser.add_argument("--unmetered", action="store_true")
    args = parser.parse_args()

    folder = Path(tempfile.mkdtemp(prefix="aimesh-waterfall-"))
    spine.prepare_database()
    port = free_port()
    spine.SIMULATOR_URL = f"http://127.0.0.1:{port}"
    os.environ["PYTHONPATH"] = os.pathsep.join([str(HOOKS), str(ROOT)])
    os.environ["AIMESH_WATERFALL"] = str(folder / "steps")
    sim = spine.start([str(spine.BIN / "aimesh"), "simulate", "--port", str(port),
                       "--latency-ms", "0"], "/tmp/bench-waterfall-sim.log")
    time.sleep(1.0)
    endpoint = add_endpoint(id="sim", base_url=spine.SIMULATOR_URL, model="sim",
                            input_usd_per_1k="0.001", output_usd_per_1k="0.002",
                            capacity=10000)
    spine.meter(not args.unmetered)
    tag = f"wf{os.getpid()}"
    workers = [
        spine.start([str(spine.BIN / "aimesh"), "worker", "-n", f"brouter{tag}@%h", "--router",
                     "-P", "threads", "-c", "16", "-l", "WARNING"],
                    "/tmp/bench-waterfall-router.log"),
        spine.start([str(spine.BIN / "aimesh"), "worker", "-n", f"bendpoint{tag}@%h",
                     "--endpoints", endpoint.id, "-P", "threads", "-c", "16", "-l", "WARNING"],
                    "/tmp/bench-waterfall-endpoint.log"),
    ]
    producer: dict[str, dict[str, float]] = {}
    try:
        spine.wait_workers([f"brouter{tag}", f"bendpoint{tag}"])
        spine.burst("spine", 200)  # warm-up: connections, caches, prepared statements
        recorded: dict[str, float] = {}
        record = accepted.record

        def timed_record(message: object) -> bool:
            done = record(message)  # type: ignore[arg-type]
            recorded["at"] = time.time()
            return done

        accepted.record = timed_record  # type: ignore[assignment]
        pending = []
        next_at = time.perf_counter()
        for i in range(args.messages):
            time.sleep(max(0.0, next_at - time.perf_counter()))
            next_at += 1.0 / args.rate
            started = time.time()
            result = spine.publish("spine", i)
            producer[result.id] = {"submit>": started, "accepted-INSERT<": recorded["at"],
                                   "submit<": time.time()}
            pending.append(result)
        for result in pending:
            value = result.get(timeout=120)
            producer[result.id]["finished_at"] = datetime.fromisoformat(
                value["finished_at"]).timestamp()
    finally:
        spine.stop_all([*workers, sim])
    worker_steps = _steps_of(folder)
    offsets: dict[str, list[float]] = collections.defaultdict(list)
    for task_id, own in producer.items():
        seen: collections.Counter[str] = collections.Counter()
        for name, at in sorted([*own.items(), *worker_steps.get(task_id, [])],
                               key=lambda step: step[1]):
            seen[name] += 1
            offsets[name if seen[name] == 1 else f"{name} #{seen[name]}"].append(
                (at - own["submit>"]) * 1000)
    order = sorted(offsets, key=lambda name: statistics.median(offsets[name]))
    before = 0.0
    print(f"{'from submit':>12} {'gap':>7}  step (messages that had it, of {len(producer)})")
    for name in order:
        at = statistics.median(offsets[name])
        print(f"{at:10.2f} ms {at - before:6.2f}  {name} ({len(offsets[name])})")
        before = at
    print(json.dumps({"steps_ms": {name: round(statistics.median(offsets[name]), 3)
                                   for name in order},
                      "finished_at_p50_ms": round(statistics.median(offsets["finished_at"]), 3),
                      "rate": args.rate, "messages": args.messages,
                      "metered": not args.unmetered}))


if __name__ == "__main__":
    main()
