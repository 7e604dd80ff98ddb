"""Worker (and simulator) processes on this machine, started in the background and stopped
again: what `aimesh cluster up/down` and `aimesh demo --broker ...` run.

Each process is `aimesh ...` in its own session (so a signal reaches its pool children
too), writing to its own log file; stopping is SIGTERM (a warm shutdown: running tasks
finish), then SIGKILL after STOP_TIMEOUT_S.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from aimesh_tasks.errors import ConfigError

READY_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 20.0
RUN_CLI = "from aimesh_tasks.cli.main import main; main()"
# A process of ours runs this module's command line; a pid now held by something else is
# not touched (the state file may outlive its processes, a reboot say).
_MARK = b"aimesh_tasks.cli.main"
# The processes this process started: asked directly (their /proc entry may still show
# this process's command line for a moment after the start).
_CHILDREN: dict[int, subprocess.Popen[bytes]] = {}


@dataclass(frozen=True)
class Spawned:
    """One background process: its role, pid, log file and Celery node name (if a
    worker) or port (if a simulator)."""

    role: str
    pid: int
    log: str
    node: str | None = None
    port: int | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe, for the state file."""
        return asdict(self)


def spawn(role: str, argv: list[str], log_dir: Path, *, node: str | None = None,
          port: int | None = None) -> Spawned:
    """Start `aimesh ARGV` in the background, its output in LOG_DIR/ROLE.log."""
    log = log_dir / f"{role}.log"
    with log.open("w") as out:
        proc = subprocess.Popen([sys.executable, "-c", RUN_CLI, *argv], env=dict(os.environ),
                                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)
    _CHILDREN[proc.pid] = proc
    return Spawned(role, proc.pid, str(log), node, port)


def on_this_host(name: str) -> str:
    """A Celery node name on this host, as ping replies carry it."""
    return f"{name}@{socket.gethostname()}"


def worker_node(role: str, pid: int) -> str:
    """The node name `aimesh worker` gives itself by default, on this host."""
    return on_this_host(f"{role}-{pid}")


def alive(pid: int) -> bool:
    """True if `pid` is one of our processes and has not exited."""
    child = _CHILDREN.get(pid)
    if child is not None:
        return child.poll() is None
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        status = Path(f"/proc/{pid}/stat").read_text().split()
    except OSError:
        return False
    # After `split()`, field 3 is the state; Z is a zombie: exited, not yet reaped.
    return _MARK in cmdline and status[2] != "Z"


def _tail(log: str) -> str:
    try:
        lines = [line for line in Path(log).read_text(errors="replace").splitlines()
                 if line.strip() and not line.startswith("{")]
    except OSError:
        return "no log"
    return lines[-1][:300] if lines else "no output"


def _port_open(port: int) -> bool:
    with socket.socket() as probe:
        probe.settimeout(0.5)
        return probe.connect_ex(("127.0.0.1", port)) == 0


def wait_ready(processes: list[Spawned], timeout_s: float = READY_TIMEOUT_S) -> None:
    """Until every worker answers a ping and every simulator accepts connections;
    ConfigError naming the log of one that exited or stayed silent."""
    from aimesh_tasks.app import app

    waiting = {p.node or str(p.port): p for p in processes}
    deadline = time.monotonic() + timeout_s
    while waiting:
        for p in waiting.values():
            if not alive(p.pid):
                raise ConfigError(f"{p.role} exited at start: {_tail(p.log)} (its log: "
                                  f"{p.log})", setting="cluster")
        if time.monotonic() > deadline:
            names = ", ".join(p.role for p in waiting.values())
            raise ConfigError(f"not ready after {timeout_s:g}s: {names}; logs in "
                              f"{Path(next(iter(waiting.values())).log).parent}",
                              setting="cluster")
        for p in [p for p in waiting.values() if p.port is not None]:
            if _port_open(p.port):  # type: ignore[arg-type]
                waiting.pop(str(p.port))
        nodes = [key for key, p in waiting.items() if p.node is not None]
        for reply in (app.control.ping(destination=nodes, timeout=0.5) if nodes else []) or []:
            for node in reply:
                waiting.pop(node, None)


def stop(process: Spawned, timeout_s: float = STOP_TIMEOUT_S) -> None:
    """SIGTERM to the process group (warm shutdown), then SIGKILL if it lingers."""
    for sig, wait_s in ((signal.SIGTERM, timeout_s), (signal.SIGKILL, 5.0)):
        if not alive(process.pid):
            return
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return
        _reap(process.pid, wait_s)


def _reap(pid: int, wait_s: float) -> None:
    child = _CHILDREN.get(pid)
    if child is not None:  # our own: wait reaps it, or it stays a zombie until we exit
        try:
            child.wait(wait_s)
            _CHILDREN.pop(pid, None)
        except subprocess.TimeoutExpired:
            pass
        return
    deadline = time.monotonic() + wait_s
    while alive(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
