"""Workflow fan-out 50 + gather vs a raw Celery chord making the same 51 HTTP calls, and
a DAG whose makespan levelling would double, against its critical path.

    python benchmarks/bench_workflow.py [--repeats 3] [--fan-out 50] [--pool threads]
        [--concurrency 16] [--latencies 0,200] [--dag-depth 4] [--dag-slow-ms 200]

One run, same broker, result backend and worker processes for both: a router worker
(aimesh.route + bench.a) and an endpoint worker (the endpoints' queues + bench.b), one
simulator per latency. The workflow's 50 steps each go through step → route → call →
record (routing, dedup, budget, audit, state in Postgres), then the gather step and the
finish task. The baseline is `chord(group(50 × bench.wf_call), bench.wf_gather)`: the
same HTTP calls to the same simulator from the endpoint worker, nothing else. Figures are
end-to-end seconds, submit → final result, medians of the repeats.

The DAG row: two chains p1 → … → pN and q1 → … → qN plus the cross edge p1 → q3 (so the
graph is not series-parallel); p's even steps and q's odd steps are slow (a simulator at
--dag-slow-ms), the others fast (a simulator at 0 ms). Every topological level holds one
slow step, so running level by level takes N × slow, while the critical path is
ceil(N / 2) × slow. The row reports the makespan (submit → result), the critical path,
the levelled makespan it would take, and the goal: critical path + 50 ms × depth; and,
for scale, the same two chains as raw Celery chains of bench.wf_call in one group (no
cross edge: it is not on the critical path), which is Celery's own cost per hop in the
same run. JSON is printed last.
Needs Redis and Postgres on loopback (Redis dbs 2/3, Postgres database aimesh_bench;
AIMESH_BENCH_DBS moves both: benchmarks/places.py).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import benchmarks.places  # noqa: E402, F401, I001  (the environment, before aimesh_tasks)

import httpx  # noqa: E402
from celery import chain, chord, group  # noqa: E402

from aimesh_tasks import Step, Workflow, submit_workflow  # noqa: E402
from aimesh_tasks.app import app  # noqa: E402
from aimesh_tasks.registry import add_endpoint  # noqa: E402
from benchmarks.bench_spine import BIN, _free_port, prepare_database, start, wait_workers  # noqa: E402

_local = threading.local()


def _client() -> httpx.Client:
    # One single-connection client per worker thread (MEASURED.md finding 1).
    client = getattr(_local, "client", None)
    if client is None:
        client = _local.client = httpx.Client(timeout=30)
    return client


def _complete(url: str, prompt: str) -> str:
    response = _client().post(f"{url}/v1/chat/completions", json={
        "model": "sim", "max_tokens": 16, "messages": [{"role": "user", "content": prompt}]})
    response.raise_for_status()
    return str(response.json()["choices"][0]["message"]["content"])


@app.task(name="bench.wf_call")
def wf_call(url: str, prompt: str) -> str:
    """Baseline header task: one HTTP call."""
    return _complete(url, prompt)


@app.task(name="bench.wf_gather")
def wf_gather(texts: list[str], url: str) -> str:
    """Baseline chord body: one HTTP call quoting every header answer."""
    return _complete(url, "Gather: " + " | ".join(texts))


def raw_chord(url: str, fan_out: int, tag: str) -> float:
    """Seconds for the raw chord, submit to result."""
    started = time.perf_counter()
    header = group(wf_call.s(url, f"Research topic {n} {tag}").set(queue="bench.b")
                   for n in range(fan_out))
    chord(header, wf_gather.s(url).set(queue="bench.b")).apply_async().get(timeout=600)
    return time.perf_counter() - started


def workflow_run(model: str, fan_out: int, tag: str) -> float:
    """Seconds for the workflow, submit to result."""
    steps = [Step(id=f"r{n}", prompt=f"Research topic {n} {tag}", model=model, max_tokens=16)
             for n in range(fan_out)]
    quote = " | ".join(f"{{{{ steps.r{n}.text }}}}" for n in range(fan_out))
    gather = Step(id="gather", prompt=f"Gather: {quote}", model=model, max_tokens=16,
                  depends_on=[s.id for s in steps])
    started = time.perf_counter()
    _, pending = submit_workflow(Workflow(agent_id="bench", steps=[*steps, gather]))
    result: dict[str, Any] = pending.get(timeout=600)
    if result["status"] != "done":
        raise RuntimeError(f"workflow failed: {result['failures']}")
    return time.perf_counter() - started


def dag_plan(depth: int) -> list[tuple[str, list[str], bool]]:
    """(step id, dependencies, slow?) of the two alternating chains and the cross edge
    p1 -> q3 (see the module docstring)."""
    plan = []
    for line, slow_first in (("p", False), ("q", True)):
        for n in range(1, depth + 1):
            deps = [f"{line}{n - 1}"] if n > 1 else []
            if line == "q" and n == 3:
                deps.append("p1")
            plan.append((f"{line}{n}", deps, (n % 2 == 1) == slow_first))
    return plan


def dag_steps(depth: int, fast: str, slow: str, tag: str) -> list[Step]:
    """The DAG as workflow steps, each quoting its dependencies' answers."""
    return [Step(id=step_id, prompt=f"DAG {tag} {step_id}: " + " ".join(
        f"{{{{ steps.{d}.text }}}}" for d in deps), model=slow if is_slow else fast,
        max_tokens=16, depends_on=deps) for step_id, deps, is_slow in dag_plan(depth)]


def dag_run(depth: int, fast: str, slow: str, tag: str) -> float:
    """Seconds for the DAG, submit to result."""
    started = time.perf_counter()
    _, pending = submit_workflow(Workflow(agent_id="bench", steps=dag_steps(
        depth, fast, slow, tag)))
    result: dict[str, Any] = pending.get(timeout=600)
    if result["status"] != "done":
        raise RuntimeError(f"DAG failed: {result['failures']}")
    return time.perf_counter() - started


def raw_dag_run(depth: int, fast_url: str, slow_url: str, tag: str) -> float:
    """Seconds for the DAG's two chains as raw Celery chains in a group."""
    chains = [chain(wf_call.si(slow_url if is_slow else fast_url, f"raw DAG {tag} {step_id}")
                    .set(queue="bench.b") for step_id, _, is_slow in dag_plan(depth)
                    if step_id.startswith(line)) for line in ("p", "q")]
    started = time.perf_counter()
    group(chains).apply_async().get(timeout=600)
    return time.perf_counter() - started


def dag_figures(depth: int, slow_ms: float, makespans: list[float], raw: list[float]
                ) -> dict[str, Any]:
    """The DAG row: makespan against the critical path, levelled makespan and goal."""
    critical_s = -(-depth // 2) * slow_ms / 1000
    makespan_s = statistics.median(makespans)
    return {"dag_depth": depth, "dag_slow_ms": slow_ms, "dag_makespan_s": round(makespan_s, 3),
            "dag_raw_chains_s": round(statistics.median(raw), 3),
            "dag_critical_path_s": round(critical_s, 3),
            "dag_levelled_s": round(depth * slow_ms / 1000, 3),
            "dag_goal_s": round(critical_s + 0.05 * depth, 3),
            "dag_overhead_ms_per_level": round((makespan_s - critical_s) * 1000 / depth, 1)}


def main() -> None:
    """Run both at each latency and the DAG row; print the figures, JSON last."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--fan-out", type=int, default=50)
    parser.add_argument("--pool", default="threads")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--latencies", default="0,200")
    parser.add_argument("--dag-depth", type=int, default=4)
    parser.add_argument("--dag-slow-ms", type=float, default=200)
    args = parser.parse_args()
    latencies = [float(x) for x in args.latencies.split(",")]
    prepare_database()
    sims, urls, models = [], {}, {}
    for latency in sorted({*latencies, 0.0, args.dag_slow_ms}):
        port = _free_port()
        sims.append(start([str(BIN / "aimesh"), "simulate", "--port", str(port),
                           "--latency-ms", str(latency)], f"/tmp/bench-wf-sim-{port}.log"))
        urls[latency], models[latency] = f"http://127.0.0.1:{port}", f"sim-{latency:g}ms"
        add_endpoint(id=f"sim{latency:g}", base_url=urls[latency], model=models[latency],
                     input_usd_per_1k="0.001", output_usd_per_1k="0.002", capacity=10000)
    time.sleep(1.0)
    tag = f"{os.getpid()}"
    common = ["-P", args.pool, "-c", str(args.concurrency), "-l", "WARNING",
              "--include", "benchmarks.bench_workflow"]
    workers = [
        start([str(BIN / "aimesh"), "worker", "-n", f"wfrouter{tag}@%h", "-Q", "bench.a",
               "--router", *common], "/tmp/bench-wf-router.log"),
        start([str(BIN / "aimesh"), "worker", "-n", f"wfendpoint{tag}@%h", "-Q", "bench.b",
               "--endpoints", "all", *common], "/tmp/bench-wf-endpoint.log"),
    ]
    figures: dict[str, Any] = {"fan_out": args.fan_out, "repeats": args.repeats,
                               "pool": args.pool, "concurrency": args.concurrency}
    try:
        wait_workers([f"wfrouter{tag}", f"wfendpoint{tag}"])
        raw_chord(urls[latencies[0]], 5, "warm")
        workflow_run(models[latencies[0]], 5, "warm")
        for latency in latencies:
            raw, flow = [], []
            for n in range(args.repeats):
                raw.append(raw_chord(urls[latency], args.fan_out, f"raw-{latency}-{n}"))
                flow.append(workflow_run(models[latency], args.fan_out, f"wf-{latency}-{n}"))
                print(f"{latency:g} ms: raw chord {raw[-1]:.3f} s, workflow {flow[-1]:.3f} s",
                      flush=True)
            key = f"{latency:g}ms"
            figures[f"raw_chord_s_{key}"] = round(statistics.median(raw), 3)
            figures[f"workflow_s_{key}"] = round(statistics.median(flow), 3)
            figures[f"ratio_{key}"] = round(statistics.median(flow) / statistics.median(raw), 2)
        makespans, raw_dag = [], []
        for n in range(args.repeats):
            raw_dag.append(raw_dag_run(args.dag_depth, urls[0.0], urls[args.dag_slow_ms],
                                       f"{tag}-{n}"))
            makespans.append(dag_run(args.dag_depth, models[0.0], models[args.dag_slow_ms],
                                     f"{tag}-{n}"))
            print(f"DAG depth {args.dag_depth}: {makespans[-1]:.3f} s, raw chains "
                  f"{raw_dag[-1]:.3f} s", flush=True)
        figures.update(dag_figures(args.dag_depth, args.dag_slow_ms, makespans, raw_dag))
    finally:
        for proc in [*workers, *sims]:
            proc.terminate()
        for proc in [*workers, *sims]:
            proc.wait(30)
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
