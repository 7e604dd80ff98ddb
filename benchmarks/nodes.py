"""Worker nodes a benchmark starts and steers while they run: which of them consume a
queue (Celery's add_consumer / cancel_consumer), and how deep a queue is.

Import it after benchmarks/places.py has set the environment (it imports bench_spine).
"""

from __future__ import annotations

import socket
import subprocess
import time
from collections.abc import Iterable
from dataclasses import dataclass

from aimesh_tasks.app import app
from aimesh_tasks.observability.exporter import broker_client, queue_depths
from aimesh_tasks.settings import get_settings
from benchmarks.bench_spine import BIN, start

# A BRPOP the worker issued before its consumer was cancelled still takes the next message
# pushed (kombu's Redis transport blocks 1 s at a time): let it run out.
BRPOP_DRAIN_S = 2.5


@dataclass(frozen=True)
class Worker:
    """A worker process: its Celery node name and pid."""

    node: str
    pid: int


def start_worker(tag: str, args: list[str], log: str) -> tuple[Worker, subprocess.Popen[bytes]]:
    """An `aimesh worker` named <tag>@host with `args` (pool, queues...), and its process."""
    node = f"{tag}@{socket.gethostname()}"
    proc = start([str(BIN / "aimesh"), "worker", "-n", node, "-l", "WARNING", *args], log)
    return Worker(node, proc.pid), proc


def cancel_consumers(queue: str, workers: Iterable[Worker]) -> None:
    """Stop `workers` consuming `queue` (see BRPOP_DRAIN_S before relying on it)."""
    for worker in workers:
        app.control.cancel_consumer(queue, destination=[worker.node], reply=True, timeout=10)


def add_consumers(queue: str, workers: Iterable[Worker]) -> None:
    """Make `workers` consume `queue` (a worker consuming it already goes on)."""
    for worker in workers:
        app.control.add_consumer(queue, destination=[worker.node], reply=True, timeout=10)


def set_consumers(queue: str, wanted: Iterable[Worker], among: Iterable[Worker]) -> None:
    """Make `wanted` the only consumers of `queue` among the workers `among`."""
    chosen = list(wanted)
    cancel_consumers(queue, [w for w in among if w not in chosen])
    time.sleep(BRPOP_DRAIN_S)
    add_consumers(queue, chosen)


def wait_queued(queue: str, n: int, poll_s: float = 0.2, timeout_s: float = 900) -> None:
    """Wait until `n` messages wait in `queue` (all its priority sub-queues)."""
    broker = broker_client(get_settings().broker_url)
    deadline = time.monotonic() + timeout_s
    while (depth := queue_depths(broker, [queue])[queue]) < n:
        if time.monotonic() > deadline:
            raise RuntimeError(f"only {depth} of {n} messages reached {queue}")
        time.sleep(poll_s)
