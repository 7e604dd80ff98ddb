"""Worker subprocesses for the tests, and the registry of those still running.

One module, imported once under one name: tests import `tests.conftest` while pytest
loads conftest.py as `conftest`, so state kept in conftest itself would exist twice.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from aimesh_tasks.app import app

ROOT = Path(__file__).resolve().parents[1]
AIMESH = str(Path(sys.executable).with_name("aimesh"))
CELERY = str(Path(sys.executable).with_name("celery"))

# Every worker this session started and has not stopped, by Celery hostname: the complete
# list of consumers on this slot's broker (tests/observability_parts.py pauses the others).
RUNNING: dict[str, WorkerProcess] = {}


class WorkerProcess:
    """A `aimesh worker` subprocess in its own process group."""

    def __init__(self, name: str, args: list[str], env: dict[str, str] | None = None) -> None:
        self.name = name
        self.log = Path(f"/tmp/aimesh-test-{name}.log")
        self.log_file = self.log.open("w")
        # args starting with "celery" run the plain Celery command line; others `aimesh worker`.
        command = ([CELERY, "-A", "aimesh_tasks.app", "worker"] if args[:1] == ["celery"]
                   else [AIMESH, "worker"])
        self.proc = subprocess.Popen(
            [*command, "-n", f"{name}@%h", "-l", "INFO", *args[args[:1] == ["celery"]:]],
            env={**os.environ, **(env or {})},
            stdout=self.log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            cwd=ROOT,
        )
        RUNNING[self.hostname] = self

    @property
    def hostname(self) -> str:
        return f"{self.name}@{socket.gethostname()}"

    def wait_ready(self, timeout_s: float = 30) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"worker {self.name} exited: {self.log.read_text()[-3000:]}")
            if app.control.ping(destination=[self.hostname], timeout=0.5):
                return
        raise RuntimeError(f"worker {self.name} not ready: {self.log.read_text()[-3000:]}")

    def stop(self) -> None:
        RUNNING.pop(self.hostname, None)
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)
        self.log_file.close()


def start_workers(specs: list[tuple[str, list[str]]], env: dict[str, str] | None = None
                  ) -> list[WorkerProcess]:
    """Start worker subprocesses and wait until each answers a ping."""
    workers = [WorkerProcess(name, args, env) for name, args in specs]
    for worker in workers:
        worker.wait_ready()
    return workers
