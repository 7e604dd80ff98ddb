"""Workflow fan-out 50 + gather vs a raw Celery chord making the same 51 HTTP calls.

    python benchmarks/bench_workflow.py [--repeats 3] [--fan-out 50] [--pool threads]
        [--concurrency 16] [--latencies 0,200]

One run, same broker, result backend and worker processes for both: a router worker
(aimesh.route + bench.a) and an endpoint worker (the endpoints' queues + bench.b), one
simulator per latency. The workflow's 50 steps each go through step → route → call →
record (routing, dedup, budget, audit, state in Postgres), then the gather step and the
finish task. The baseline is `chord(group(50 × bench.wf_call), bench.wf_gather)`: the
same HTTP calls to the same simulator from the endpoint worker, nothing else. Figures are
end-to-end seconds, submit → final result, medians of the repeats. JSON is printed last.
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
from celery import chord, group  # noqa: E402

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


def main() -> None:
    """Run both at each latency and print the figures, JSON last."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--fan-out", type=int, default=50)
    parser.add_argument("--pool", default="threads")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--latencies", default="0,200")
    args = parser.parse_args()
    latencies = [float(x) for x in args.latencies.split(",")]
    prepare_database()
    sims, urls, models = [], {}, {}
    for latency in latencies:
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
    finally:
        for proc in [*workers, *sims]:
            proc.terminate()
        for proc in [*workers, *sims]:
            proc.wait(30)
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
