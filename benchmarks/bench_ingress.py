"""The HTTP ingress against calling `submit()` directly: same broker, workers, simulator.

    python benchmarks/bench_ingress.py [--rate 20] [--seconds 10] [--burst 1000]
        [--concurrency 100] [--held 300] [--held-latency-ms 1000] [--held-word-ms 50]
        [--held-repeats 3] [--parts latency,throughput,held]

Starts a simulator (0 ms), a router and an endpoint worker (threads) and one ingress
process (`uvicorn aimesh_tasks.ingress.app:app`, one worker), then measures:
(a) latency at a paced rate, end to end as a client sees it: `submit()` + `get()` in the
    benchmark process, and POST /v1/chat/completions through the ingress; the difference
    is what the ingress adds (HTTP, key check, the async wait);
(b) throughput at `--concurrency` requests in flight (asyncio httpx clients), against
    `submit()` from as many threads;
(c) `--held` requests in flight at once against a second endpoint answering after
    `--held-latency-ms`: first as plain requests (the baseline), then as SSE streams with
    usage, which go through the queue (the endpoint worker streams the provider's answer,
    its words `--held-word-ms` apart, and the ingress relays each delta as it comes). All
    must complete (every stream with its text in several chunks, its usage and [DONE]);
    reported: how many streams were open with text flowing at once at the peak, the time
    to each stream's first text, and the ingress process's resident memory, idle and at
    the peak, for both; medians of `--held-repeats` runs.
Every prompt is fresh (no cache hits). Prints one JSON line last. Needs Redis and
Postgres on loopback: Redis dbs 2/3 and the Postgres database aimesh_bench (created if
missing; AIMESH_BENCH_DBS moves both, see benchmarks/places.py). Logs go to
/tmp/bench-ingress-<pid>-*.log.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

os.environ["AIMESH_LOG_LEVEL"] = "WARNING"
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
# Redis dbs and the Postgres database by AIMESH_BENCH_DBS (benchmarks/places.py).
from benchmarks.places import BENCH_DB, BROKER_DB, ENV, LIVE_DB, REDIS, create_database  # noqa: E402, I001
from benchmarks.procfs import free_port  # noqa: E402

import httpx  # noqa: E402
import redis  # noqa: E402

from aimesh_tasks import submit  # noqa: E402
from aimesh_tasks.api_keys import create_key  # noqa: E402
from aimesh_tasks.app import app  # noqa: E402
from aimesh_tasks.db.migrate import upgrade  # noqa: E402
from aimesh_tasks.registry import add_endpoint, list_endpoints, remove_endpoint  # noqa: E402

BIN = Path(sys.executable).parent
AGENT = "bench-ingress"


def prepare() -> None:
    """Create and migrate the benchmark database; empty its Redis dbs and endpoints."""
    create_database()
    upgrade(BENCH_DB)
    for db in (BROKER_DB, LIVE_DB):
        redis.Redis.from_url(f"{REDIS}/{db}").flushdb()
    for endpoint in list_endpoints():
        remove_endpoint(endpoint.id)


def start(cmd: list[str], log: str) -> subprocess.Popen[bytes]:
    """A subprocess with the benchmark environment, output to a log file."""
    return subprocess.Popen(cmd, env={**os.environ, **ENV},
                            stdout=open(f"/tmp/bench-ingress-{os.getpid()}-{log}.log", "w"),
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
    raise RuntimeError(f"{what} did not come up; see /tmp/bench-ingress-{os.getpid()}-*.log")


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
    """Start `call` at `rate` per second for `seconds`, each in its own thread; a call
    that fails fails the run."""
    with ThreadPoolExecutor(max_workers=256) as pool:
        started = []
        next_at = time.perf_counter()
        for _ in range(int(rate * seconds)):
            time.sleep(max(0.0, next_at - time.perf_counter()))
            started.append(pool.submit(call))
            next_at += 1.0 / rate
        return [future.result() for future in started]


def submit_throughput(n: int, concurrency: int) -> float:
    """Messages per second for n submit()+get() from `concurrency` threads."""
    started = time.perf_counter()
    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        list(pool.map(lambda _: via_submit(), range(n)))
    return n / (time.perf_counter() - started)


async def _ingress_load(url: str, key: str, n: int, concurrency: int, model: str) -> float:
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    left = iter(range(n))
    async with httpx.AsyncClient(limits=limits, timeout=300) as client:
        async def worker() -> None:
            for _ in left:
                body: dict[str, Any] = {"model": model, "max_tokens": 16,
                                        "messages": [{"role": "user", "content": prompt()}]}
                reply = await client.post(f"{url}/v1/chat/completions", json=body,
                                          headers={"Authorization": f"Bearer {key}"})
                reply.raise_for_status()

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return n / (time.perf_counter() - started)


def rss_kib(pid: int) -> int:
    """Resident memory of a process, in KiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


class Held:
    """What a held phase saw: streams open with text flowing, and times to first text."""

    def __init__(self) -> None:
        self.open = 0
        self.peak = 0
        self.first_text_ms: list[float] = []

    def text_began(self, started: float) -> None:
        self.first_text_ms.append((time.perf_counter() - started) * 1000)
        self.open += 1
        self.peak = max(self.peak, self.open)


async def _one_stream(client: httpx.AsyncClient, url: str, key: str, model: str,
                      held: Held) -> None:
    """One streaming request read chunk by chunk; it must end with usage and [DONE]."""
    body = {"model": model, "max_tokens": 16, "stream": True,
            "stream_options": {"include_usage": True},
            "messages": [{"role": "user", "content": prompt()}]}
    started = time.perf_counter()
    texts, usage, done = 0, None, False
    async with client.stream("POST", f"{url}/v1/chat/completions", json=body,
                             headers={"Authorization": f"Bearer {key}"}) as reply:
        reply.raise_for_status()
        async for line in reply.aiter_lines():
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                done = True
                break
            chunk = json.loads(line[6:])
            if chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                if not texts:
                    held.text_began(started)
                texts += 1
            usage = chunk.get("usage") or usage
    if texts:
        held.open -= 1
    assert done and usage and texts >= 2, (done, usage, texts)


async def _held_load(url: str, key: str, n: int, model: str, stream: bool) -> Held:
    held = Held()
    limits = httpx.Limits(max_connections=n, max_keepalive_connections=n)
    async with httpx.AsyncClient(limits=limits, timeout=300) as client:
        async def plain() -> None:
            reply = await client.post(
                f"{url}/v1/chat/completions", headers={"Authorization": f"Bearer {key}"},
                json={"model": model, "max_tokens": 16,
                      "messages": [{"role": "user", "content": prompt()}]})
            reply.raise_for_status()

        await asyncio.gather(*(_one_stream(client, url, key, model, held) if stream
                               else plain() for _ in range(n)))
    return held


def held_phase(url: str, key: str, n: int, pid: int, model: str, stream: bool
               ) -> dict[str, float]:
    """n requests at once against the slow endpoint; the ingress's memory meanwhile."""
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
        held = asyncio.run(_held_load(url, key, n, model, stream))
    finally:
        done.set()
        sampler.join()
    figures = {"seconds": time.perf_counter() - started, "rss_idle_mib": idle / 1024,
               "rss_peak_mib": peak[0] / 1024}
    if stream:
        figures |= {"open_peak": float(held.peak),
                    "first_text_p50_ms": percentile(held.first_text_ms, 0.5),
                    "first_text_p99_ms": percentile(held.first_text_ms, 0.99)}
    return figures


def held_figures(url: str, key: str, n: int, pid: int, model: str, repeats: int
                 ) -> dict[str, Any]:
    """Medians over `repeats` runs of the plain baseline, then the streams, alternating."""
    runs: dict[bool, list[dict[str, float]]] = {False: [], True: []}
    for _ in range(repeats):
        for stream in (False, True):
            runs[stream].append(held_phase(url, key, n, pid, model, stream))

    def median(stream: bool, name: str) -> float:
        return round(statistics.median(run[name] for run in runs[stream]), 1)

    return {"held_streams": n, "held_repeats": repeats,
            "held_streams_open_peak": median(True, "open_peak"),
            "held_first_text_p50_ms": median(True, "first_text_p50_ms"),
            "held_first_text_p99_ms": median(True, "first_text_p99_ms"),
            "held_streams_seconds": median(True, "seconds"),
            "held_plain_seconds": median(False, "seconds"),
            "ingress_rss_idle_mib": median(True, "rss_idle_mib"),
            "ingress_rss_peak_streams_mib": median(True, "rss_peak_mib"),
            "ingress_rss_peak_plain_mib": median(False, "rss_peak_mib"),
            "held_rss_streams_to_plain": round(median(True, "rss_peak_mib")
                                               / median(False, "rss_peak_mib"), 3)}


def latency_figures(client: httpx.Client, url: str, key: str, rate: float, seconds: float
                    ) -> dict[str, float]:
    """(a): submit() against the ingress at a paced rate, p50/p99 and what it adds."""
    direct = paced(via_submit, rate, seconds)
    through = paced(lambda: via_ingress(client, url, key), rate, seconds)
    return {"rate_s": rate,
            "submit_p50_ms": round(percentile(direct, 0.5), 2),
            "submit_p99_ms": round(percentile(direct, 0.99), 2),
            "ingress_p50_ms": round(percentile(through, 0.5), 2),
            "ingress_p99_ms": round(percentile(through, 0.99), 2),
            "added_p50_ms": round(percentile(through, 0.5) - percentile(direct, 0.5), 2),
            "added_p99_ms": round(percentile(through, 0.99) - percentile(direct, 0.99), 2),
            "added_mean_ms": round(statistics.mean(through) - statistics.mean(direct), 2)}


def main() -> None:
    """Run the measurements and print the figures, JSON last."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rate", type=float, default=20.0, help="paced messages per second")
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--burst", type=int, default=1000, help="messages for throughput")
    parser.add_argument("--concurrency", type=int, default=100)
    parser.add_argument("--held", type=int, default=300)
    parser.add_argument("--held-latency-ms", type=float, default=1000.0)
    parser.add_argument("--held-word-ms", type=float, default=50.0,
                        help="the slow endpoint's words this far apart in a stream")
    parser.add_argument("--held-repeats", type=int, default=3)
    parser.add_argument("--parts", default="latency,throughput,held",
                        help="which of (a) latency, (b) throughput, (c) held to measure")
    args = parser.parse_args()
    parts = set(args.parts.split(","))
    if not parts <= {"latency", "throughput", "held"}:
        parser.error(f"--parts: {args.parts!r}: give latency, throughput and/or held")

    prepare()
    sim_port, slow_port, port = free_port(), free_port(), free_port()
    procs = [start([str(BIN / "aimesh"), "simulate", "--port", str(sim_port)],
                   "sim"),
             start([str(BIN / "aimesh"), "simulate", "--port", str(slow_port), "--latency-ms",
                    str(args.held_latency_ms)], "slow")]
    url = f"http://127.0.0.1:{port}"
    try:
        for sim in (sim_port, slow_port):
            wait_for(lambda sim=sim: httpx.get(f"http://127.0.0.1:{sim}/health").status_code
                     == 200, "the simulators")
        httpx.post(f"http://127.0.0.1:{slow_port}/_sim/config",
                   json={"word_interval_ms": args.held_word_ms}).raise_for_status()
        add_endpoint(id="fast", base_url=f"http://127.0.0.1:{sim_port}", model="fast",
                     input_usd_per_1k="0.001", output_usd_per_1k="0.002", capacity=10000)
        add_endpoint(id="slow", base_url=f"http://127.0.0.1:{slow_port}", model="slow",
                     input_usd_per_1k="0", output_usd_per_1k="0", capacity=10000)
        tag = str(os.getpid())
        procs += [
            start([str(BIN / "aimesh"), "worker", "-n", f"irouter{tag}@%h", "--router",
                   "-P", "threads", "-c", "16", "-l", "WARNING"], "router"),
            start([str(BIN / "aimesh"), "worker", "-n", f"iendpoint{tag}@%h", "--endpoints",
                   "all", "-P", "threads", "-c", str(max(64, args.held)), "-l", "WARNING"],
                  "endpoint"),
            start([str(BIN / "uvicorn"), "aimesh_tasks.ingress.app:app", "--port", str(port),
                   "--log-level", "warning"], "server"),
        ]
        wait_for(lambda: workers_up([f"irouter{tag}", f"iendpoint{tag}"]), "the workers")
        wait_for(lambda: httpx.get(f"{url}/healthz").status_code == 200, "the ingress")
        key = create_key(AGENT).key
        client = httpx.Client(timeout=120)
        for _ in range(20):  # warm-up: connections, caches, the registry copy
            via_submit()
            via_ingress(client, url, key)
        figures: dict[str, Any] = {}
        if "latency" in parts:
            figures |= latency_figures(client, url, key, args.rate, args.seconds)
        if "throughput" in parts:
            submit_rate = submit_throughput(args.burst, args.concurrency)
            ingress_rate = asyncio.run(_ingress_load(url, key, args.burst, args.concurrency,
                                                     "fast"))
            figures |= {"concurrency": args.concurrency, "burst": args.burst,
                        "submit_msgs_s": round(submit_rate, 1),
                        "ingress_msgs_s": round(ingress_rate, 1),
                        "throughput_ratio": round(ingress_rate / submit_rate, 3)}
        if "held" in parts:
            figures |= held_figures(url, key, args.held, procs[-1].pid, "slow",
                                    args.held_repeats)
            figures |= {"held_latency_ms": args.held_latency_ms,
                        "held_word_ms": args.held_word_ms}
    finally:
        stop_all(procs)
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
