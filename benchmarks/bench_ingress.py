"""The HTTP ingress against calling `submit()` directly: same broker, workers, simulator.

    python benchmarks/bench_ingress.py [--rate 20] [--seconds 10] [--burst 1000]
        [--concurrency 100] [--held 300] [--held-latency-ms 1000]

Starts a simulator (0 ms), a router and an endpoint worker (threads) and one ingress
process (`uvicorn aimesh_tasks.ingress.app:app`, one worker), then measures:
(a) latency at a paced rate, end to end as a client sees it: `submit()` + `get()` in the
    benchmark process, and POST /v1/chat/completions through the ingress; the difference
    is what the ingress adds (HTTP, key check, the async wait);
(b) throughput at `--concurrency` requests in flight (asyncio httpx clients), against
    `submit()` from as many threads;
(c) `--held` requests in flight at once against a second endpoint answering after
    `--held-latency-ms`, as SSE streams: all must complete, and the ingress process's
    peak resident memory is reported.
Every prompt is fresh (no cache hits). Prints one JSON line last. Needs Redis and
Postgres on loopback: Redis dbs AIMESH_BENCH_DBS (default "2,3") and the Postgres
database aimesh_bench_ingress (created if missing).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

REDIS = os.environ.get("AIMESH_BENCH_REDIS", "redis://127.0.0.1:6379")
BROKER_DB, LIVE_DB = os.environ.get("AIMESH_BENCH_DBS", "2,3").split(",")
PG_ADMIN = "postgresql://postgres@127.0.0.1:5432/postgres"
BENCH_DB = "postgresql://postgres@127.0.0.1:5432/aimesh_bench_ingress"
ENV = {
    "AIMESH_BROKER_URL": f"{REDIS}/{BROKER_DB}",
    "AIMESH_RESULT_BACKEND": f"{REDIS}/{BROKER_DB}",
    "AIMESH_REDIS_URL": f"{REDIS}/{LIVE_DB}",
    "AIMESH_DATABASE_URL": BENCH_DB,
    "AIMESH_LOG_LEVEL": "WARNING",
}
os.environ.update(ENV)
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import httpx  # noqa: E402
import psycopg  # noqa: E402
import redis  # noqa: E402

from aimesh_tasks import submit  # noqa: E402
from aimesh_tasks.api_keys import create_key  # noqa: E402
from aimesh_tasks.app import app  # noqa: E402
from aimesh_tasks.db.migrate import upgrade  # noqa: E402
from aimesh_tasks.registry import add_endpoint, list_endpoints, remove_endpoint  # noqa: E402

BIN = Path(sys.executable).parent
AGENT = "bench-ingress"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def prepare() -> None:
    """Create and migrate the benchmark database; empty its Redis dbs and endpoints."""
    with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
        if not conn.execute("SELECT 1 FROM pg_database WHERE datname="
                            "'aimesh_bench_ingress'").fetchone():
            conn.execute("CREATE DATABASE aimesh_bench_ingress")
    upgrade(BENCH_DB)
    for db in (BROKER_DB, LIVE_DB):
        redis.Redis.from_url(f"{REDIS}/{db}").flushdb()
    for endpoint in list_endpoints():
        remove_endpoint(endpoint.id)


def start(cmd: list[str], log: str) -> subprocess.Popen[bytes]:
    """A subprocess with the benchmark environment, output to a log file."""
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


def wait_for(check: Any, what: str, timeout_s: float = 60) -> None:
    """Poll `check` until it is true, or stop naming `what`."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if check():
                return
        except (httpx.HTTPError, OSError):
            pass
        time.sleep(0.1)
    raise RuntimeError(f"{what} did not come up; see /tmp/bench-ingress-*.log")


def workers_up(names: list[str]) -> bool:
    seen = {n for reply in app.control.ping(timeout=0.5) or [] for n in reply}
    return all(any(s.startswith(n) for s in seen) for n in names)


def percentile(values: list[float], q: float) -> float:
    """The q-quantile (0..1) by nearest rank."""
    ordered = sorted(values)
    return ordered[max(0, min(len(ordered) - 1, int(round(q * len(ordered) + 0.5)) - 1))]


def prompt() -> str:
    return f"ingress benchmark {uuid.uuid4().hex}"


def via_submit() -> float:
    """One message through submit() and AsyncResult.get(), in ms."""
    started = time.perf_counter()
    submit(agent_id=AGENT, prompt=prompt(), max_tokens=16, model="fast").get(timeout=120)
    return (time.perf_counter() - started) * 1000


def via_ingress(client: httpx.Client, url: str, key: str) -> float:
    """One message through POST /v1/chat/completions, in ms."""
    started = time.perf_counter()
    reply = client.post(f"{url}/v1/chat/completions", headers={"Authorization": f"Bearer {key}"},
                        json={"model": "fast", "max_tokens": 16,
                              "messages": [{"role": "user", "content": prompt()}]})
    reply.raise_for_status()
    return (time.perf_counter() - started) * 1000


def paced(call: Any, rate: float, seconds: float) -> list[float]:
    """Start `call` at `rate` per second for `seconds`, each in its own thread."""
    latencies: list[float] = []
    lock = threading.Lock()

    def one() -> None:
        value = call()
        with lock:
            latencies.append(value)

    with ThreadPoolExecutor(max_workers=256) as pool:
        next_at = time.perf_counter()
        for _ in range(int(rate * seconds)):
            time.sleep(max(0.0, next_at - time.perf_counter()))
            pool.submit(one)
            next_at += 1.0 / rate
    return latencies


def submit_throughput(n: int, concurrency: int) -> float:
    """Messages per second for n submit()+get() from `concurrency` threads."""
    started = time.perf_counter()
    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        list(pool.map(lambda _: via_submit(), range(n)))
    return n / (time.perf_counter() - started)


async def _ingress_load(url: str, key: str, n: int, concurrency: int, model: str,
                        stream: bool) -> float:
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    left = iter(range(n))
    async with httpx.AsyncClient(limits=limits, timeout=300) as client:
        async def worker() -> None:
            for _ in left:
                body: dict[str, Any] = {"model": model, "max_tokens": 16, "stream": stream,
                                        "messages": [{"role": "user", "content": prompt()}]}
                reply = await client.post(f"{url}/v1/chat/completions", json=body,
                                          headers={"Authorization": f"Bearer {key}"})
                reply.raise_for_status()
                if stream:
                    assert reply.text.rstrip().endswith("data: [DONE]")

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return n / (time.perf_counter() - started)


def rss_kib(pid: int) -> int:
    """Resident memory of a process, in KiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def held_streams(url: str, key: str, n: int, pid: int, model: str) -> dict[str, Any]:
    """n streaming requests at once against the slow endpoint; peak ingress memory."""
    peak = [rss_kib(pid)]
    idle = peak[0]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], rss_kib(pid))
            time.sleep(0.05)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    started = time.perf_counter()
    try:
        rate = asyncio.run(_ingress_load(url, key, n, n, model, stream=True))
    finally:
        done.set()
        sampler.join()
    return {"held_streams": n, "held_seconds": round(time.perf_counter() - started, 2),
            "held_rate_s": round(rate, 1), "ingress_rss_idle_mib": round(idle / 1024, 1),
            "ingress_rss_peak_mib": round(peak[0] / 1024, 1)}


def main() -> None:
    """Run the measurements and print the figures, JSON last."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rate", type=float, default=20.0, help="paced messages per second")
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--burst", type=int, default=1000, help="messages for throughput")
    parser.add_argument("--concurrency", type=int, default=100)
    parser.add_argument("--held", type=int, default=300)
    parser.add_argument("--held-latency-ms", type=float, default=1000.0)
    args = parser.parse_args()

    prepare()
    sim_port, slow_port, port = _free_port(), _free_port(), _free_port()
    procs = [start([str(BIN / "aimesh"), "simulate", "--port", str(sim_port)],
                   "/tmp/bench-ingress-sim.log"),
             start([str(BIN / "aimesh"), "simulate", "--port", str(slow_port), "--latency-ms",
                    str(args.held_latency_ms)], "/tmp/bench-ingress-slow.log")]
    url = f"http://127.0.0.1:{port}"
    try:
        for sim in (sim_port, slow_port):
            wait_for(lambda sim=sim: httpx.get(f"http://127.0.0.1:{sim}/health").status_code
                     == 200, "the simulators")
        add_endpoint(id="fast", base_url=f"http://127.0.0.1:{sim_port}", model="fast",
                     input_usd_per_1k="0.001", output_usd_per_1k="0.002", capacity=10000)
        add_endpoint(id="slow", base_url=f"http://127.0.0.1:{slow_port}", model="slow",
                     input_usd_per_1k="0", output_usd_per_1k="0", capacity=10000)
        tag = str(os.getpid())
        procs += [
            start([str(BIN / "aimesh"), "worker", "-n", f"irouter{tag}@%h", "--router",
                   "-P", "threads", "-c", "16", "-l", "WARNING"], "/tmp/bench-ingress-router.log"),
            start([str(BIN / "aimesh"), "worker", "-n", f"iendpoint{tag}@%h", "--endpoints",
                   "all", "-P", "threads", "-c", str(max(64, args.held)), "-l", "WARNING"],
                  "/tmp/bench-ingress-endpoint.log"),
            start([str(BIN / "uvicorn"), "aimesh_tasks.ingress.app:app", "--port", str(port),
                   "--log-level", "warning"], "/tmp/bench-ingress-server.log"),
        ]
        wait_for(lambda: workers_up([f"irouter{tag}", f"iendpoint{tag}"]), "the workers")
        wait_for(lambda: httpx.get(f"{url}/healthz").status_code == 200, "the ingress")
        key = create_key(AGENT).key
        client = httpx.Client(timeout=120)
        for _ in range(20):  # warm-up: connections, caches, the registry copy
            via_submit()
            via_ingress(client, url, key)
        direct = paced(via_submit, args.rate, args.seconds)
        through = paced(lambda: via_ingress(client, url, key), args.rate, args.seconds)
        submit_rate = submit_throughput(args.burst, args.concurrency)
        ingress_rate = asyncio.run(_ingress_load(url, key, args.burst, args.concurrency,
                                                 "fast", stream=False))
        held = held_streams(url, key, args.held, procs[-1].pid, "slow")
    finally:
        stop_all(procs)
    figures = {
        "rate_s": args.rate,
        "submit_p50_ms": round(percentile(direct, 0.5), 2),
        "submit_p99_ms": round(percentile(direct, 0.99), 2),
        "ingress_p50_ms": round(percentile(through, 0.5), 2),
        "ingress_p99_ms": round(percentile(through, 0.99), 2),
        "added_p50_ms": round(percentile(through, 0.5) - percentile(direct, 0.5), 2),
        "added_p99_ms": round(percentile(through, 0.99) - percentile(direct, 0.99), 2),
        "added_mean_ms": round(statistics.mean(through) - statistics.mean(direct), 2),
        "concurrency": args.concurrency,
        "submit_msgs_s": round(submit_rate, 1),
        "ingress_msgs_s": round(ingress_rate, 1),
        "throughput_ratio": round(ingress_rate / submit_rate, 3),
        **held,
        "held_latency_ms": args.held_latency_ms,
        "burst": args.burst,
    }
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
