"""The spine against the peer users pick instead: LiteLLM's Router, same simulator, same run.

    python benchmarks/bench_peer.py [--messages 1000] [--repeats 3] [--concurrency 100]

Starts the simulator (0 ms latency) and the spine's two workers the way bench_spine.py
does, with the default policies on (loop cap, routes, ACL, rate limits, budget, retry,
breaker). Then, alternating, for each repeat: the spine's burst throughput (msgs/s of
`submit()` → result) and LiteLLM Router's req/s with `--concurrency` requests in flight
(`Router.acompletion`, one deployment: the simulator as an OpenAI-compatible model).

LiteLLM pins many packages, so it never enters the project's environment: it is installed
into its own virtualenv under the temp folder (kept between runs) and run there as a
subprocess. If it cannot be installed (no package index), its row is skipped with a line
saying so. Prints one JSON line last (issue 18, goal 2).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.bench_spine import (  # noqa: E402
    BIN,
    _free_port,
    burst,
    prepare_database,
    start,
    stop_all,
    wait_workers,
)

PEER_VENV = Path(tempfile.gettempdir()) / "aimesh-bench-litellm"
PEER_SCRIPT = r'''
import asyncio, json, sys, time
from importlib.metadata import version
import litellm
from litellm import Router

url, n, concurrency = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
litellm.telemetry = False
router = Router(model_list=[{"model_name": "sim", "litellm_params": {
    "model": "openai/sim", "api_base": url + "/v1", "api_key": "bench"}}])

async def main():
    gate = asyncio.Semaphore(concurrency)
    async def one(i):
        async with gate:
            await router.acompletion(model="sim", max_tokens=16, messages=[
                {"role": "user", "content": f"benchmark message {i}"}])
    await asyncio.gather(*(one(i) for i in range(50)))  # warm-up
    started = time.perf_counter()
    await asyncio.gather(*(one(i) for i in range(n)))
    print(json.dumps({"req_s": n / (time.perf_counter() - started),
                      "version": version("litellm")}))

asyncio.run(main())
'''


def peer_python() -> Path | None:
    """The peer virtualenv's python, installing LiteLLM there if it is not yet; None (and
    a line saying why) when it cannot be installed."""
    python = PEER_VENV / "bin" / "python"
    if python.exists() and subprocess.run([str(python), "-c", "import litellm"],
                                          capture_output=True).returncode == 0:
        return python
    print(f"installing litellm into {PEER_VENV} (once) ...", flush=True)
    made = subprocess.run([sys.executable, "-m", "venv", str(PEER_VENV)], capture_output=True)
    if made.returncode == 0:
        made = subprocess.run([str(python), "-m", "pip", "install", "--quiet", "litellm"],
                              capture_output=True, text=True)
    if made.returncode != 0:
        print(f"skipping the LiteLLM row: could not install litellm ({made.stderr[-300:]!r})")
        return None
    return python


def litellm_req_s(python: Path, url: str, n: int, concurrency: int) -> tuple[float, str]:
    """LiteLLM Router's requests per second for n requests, `concurrency` in flight."""
    done = subprocess.run([str(python), "-c", PEER_SCRIPT, url, str(n), str(concurrency)],
                          capture_output=True, text=True, timeout=900)
    if done.returncode != 0:
        raise RuntimeError(f"the LiteLLM run failed: {done.stderr[-1000:]}")
    figures = json.loads(done.stdout.strip().splitlines()[-1])
    return float(figures["req_s"]), str(figures.get("version"))


def main() -> None:
    """Run both, alternating; print the figures, JSON last."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--messages", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--concurrency", type=int, default=100, help="LiteLLM in flight")
    parser.add_argument("--workers-concurrency", type=int, default=16)
    args = parser.parse_args()

    from aimesh_tasks.registry import add_endpoint

    python = peer_python()
    prepare_database()
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    sim = start([str(BIN / "aimesh"), "simulate", "--port", str(port), "--latency-ms", "0"],
                "/tmp/bench-peer-sim.log")
    time.sleep(1.0)
    endpoint = add_endpoint(id="sim", base_url=url, model="sim", input_usd_per_1k="0.001",
                            output_usd_per_1k="0.002", capacity=10000)
    tag = f"peer{int(time.time())}"
    workers = [
        start([str(BIN / "aimesh"), "worker", "-n", f"brouter{tag}@%h", "--router", "-P",
               "threads", "-c", str(args.workers_concurrency), "-l", "WARNING"],
              "/tmp/bench-peer-router.log"),
        start([str(BIN / "aimesh"), "worker", "-n", f"bendpoint{tag}@%h", "--endpoints",
               endpoint.id, "-P", "threads", "-c", str(args.workers_concurrency), "-l",
               "WARNING"], "/tmp/bench-peer-endpoint.log"),
    ]
    spine: list[float] = []
    peer: list[float] = []
    version = None
    try:
        wait_workers([f"brouter{tag}", f"bendpoint{tag}"])
        burst("spine", 100)  # warm-up
        for _ in range(args.repeats):
            spine.append(burst("spine", args.messages))
            line = f"spine {spine[-1]:.0f} msgs/s"
            if python is not None:
                req_s, version = litellm_req_s(python, url, args.messages, args.concurrency)
                peer.append(req_s)
                line += f", LiteLLM Router {req_s:.0f} req/s (c={args.concurrency})"
            print(line, flush=True)
    finally:
        stop_all([*workers, sim])
    spine_tp = statistics.median(spine)
    figures: dict[str, object] = {
        "spine_msgs_s": round(spine_tp, 1),
        "litellm_req_s": round(statistics.median(peer), 1) if peer else None,
        "ratio_to_litellm": round(spine_tp / statistics.median(peer), 3) if peer else None,
        "litellm_version": version,
        "litellm_concurrency": args.concurrency,
        "messages": args.messages,
        "repeats": args.repeats,
    }
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
