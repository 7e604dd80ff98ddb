"""Worker subprocesses for `aimesh demo --broker ... --db ...`: a router and an endpoint
worker, started with the demo's environment and stopped (SIGTERM, then SIGKILL) after."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from aimesh_tasks.errors import ConfigError

READY_TIMEOUT_S = 45.0
STOP_TIMEOUT_S = 20.0
_RUN_CLI = "from aimesh_tasks.cli.main import main; main()"


class DemoWorker:
    """One `aimesh worker` subprocess in its own process group, logging to a file."""

    def __init__(self, role: str, args: list[str], log_dir: Path) -> None:
        self.name = f"aimesh-demo-{role}-{uuid.uuid4().hex[:6]}"
        self.log = log_dir / f"{role}.log"
        with self.log.open("w") as log_file:
            self.proc = subprocess.Popen(
                [sys.executable, "-c", _RUN_CLI, "worker", "-n", f"{self.name}@%h",
                 "-l", "WARNING", *args],
                env=dict(os.environ), stdout=log_file, stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    @property
    def hostname(self) -> str:
        """The Celery node name, as ping replies carry it."""
        return f"{self.name}@{socket.gethostname()}"

    def exited(self) -> bool:
        """True if the process is gone (it failed to start, or was stopped)."""
        return self.proc.poll() is not None

    def stop(self) -> None:
        """SIGTERM (warm shutdown), then SIGKILL if it lingers."""
        if self.exited():
            return
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(5)


def _wait_ready(workers: list[DemoWorker]) -> None:
    from aimesh_tasks.app import app

    waiting = {w.hostname: w for w in workers}
    deadline = time.monotonic() + READY_TIMEOUT_S
    while waiting:
        for worker in waiting.values():
            if worker.exited():
                raise ConfigError(f"demo worker {worker.name} exited at start; its log: "
                                  f"{worker.log} ({_tail(worker.log)})")
        if time.monotonic() > deadline:
            raise ConfigError(f"demo workers not ready after {READY_TIMEOUT_S:g}s; logs in "
                              f"{next(iter(waiting.values())).log.parent}")
        for reply in app.control.ping(destination=list(waiting), timeout=0.5) or []:
            for hostname in reply:
                waiting.pop(hostname, None)


def _tail(log: Path) -> str:
    lines = [line for line in log.read_text(errors="replace").splitlines() if line.strip()]
    return lines[-1][:300] if lines else "empty"


@contextmanager
def demo_workers(endpoint_ids: list[str]) -> Iterator[Path]:
    """A router worker and a worker for the given endpoints, ready; yields the log dir."""
    log_dir = Path(tempfile.mkdtemp(prefix="aimesh-demo-workers-"))
    workers: list[DemoWorker] = []
    try:
        workers.append(DemoWorker("router", ["--router", "-P", "threads", "-c", "8"], log_dir))
        workers.append(DemoWorker(
            "endpoints", ["--endpoints", ",".join(endpoint_ids), "-P", "threads", "-c", "32"],
            log_dir))
        _wait_ready(workers)
        yield log_dir
    finally:
        for worker in workers:
            worker.stop()
