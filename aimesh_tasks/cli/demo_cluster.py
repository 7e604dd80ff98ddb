"""Worker subprocesses for `aimesh demo --broker ... --db ...`: a router and an endpoint
worker, started with the demo's environment and stopped (SIGTERM, then SIGKILL) after.
Their logs go to a temporary directory, removed afterwards unless a worker failed to
start (the error names the log to read)."""

from __future__ import annotations

import shutil
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from aimesh_tasks.cli.local_cluster import Spawned, on_this_host, spawn, stop, wait_ready


def _worker(role: str, args: list[str], log_dir: Path) -> Spawned:
    # A name of its own (not the default <role>-<pid>) marks the demo's processes.
    name = f"aimesh-demo-{role}-{uuid.uuid4().hex[:6]}"
    process = spawn(role, ["worker", "-n", f"{name}@%h", "-l", "WARNING", *args], log_dir)
    return Spawned(role, process.pid, process.log, node=on_this_host(name))


@contextmanager
def demo_workers(endpoint_ids: list[str]) -> Iterator[Path]:
    """A router worker and a worker for the given endpoints, ready; yields the log dir."""
    log_dir = Path(tempfile.mkdtemp(prefix="aimesh-demo-workers-"))
    workers: list[Spawned] = []
    started = False
    try:
        # The pools the README recommends: prefork routers, threads for endpoint workers.
        workers.append(_worker("router", ["--router", "-P", "prefork", "-c", "2"], log_dir))
        workers.append(_worker("endpoints", ["--endpoints", ",".join(endpoint_ids), "-P",
                                             "threads", "-c", "32"], log_dir))
        wait_ready(workers)
        started = True
        yield log_dir
    finally:
        for worker in workers:
            stop(worker)
        if started:
            shutil.rmtree(log_dir, ignore_errors=True)
