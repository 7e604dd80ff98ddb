"""What a benchmark reads about this machine: a process's CPU seconds and resident memory
from /proc, its connections, the whole machine's busy CPU, a free port to start a
server on, and the local Postgres server's postmaster. No side effects: a
benchmark may import it before it sets its environment."""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import psycopg

TICKS = os.sysconf("SC_CLK_TCK")


def cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process and its reaped children (/proc/PID/stat)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    utime, stime, cutime, cstime = (int(v) for v in fields[11:15])
    return (utime + stime + cutime + cstime) / TICKS


def tree_pids(pid: int) -> list[int]:
    """A process and its live descendants (prefork children included)."""
    pids = [pid]
    for child in Path(f"/proc/{pid}/task").glob("*/children"):
        try:
            kids = child.read_text().split()
        except OSError:  # the thread or the process has just exited
            continue
        for kid in kids:
            pids.extend(tree_pids(int(kid)))
    return pids


def tree_cpu_s(pid: int) -> float:
    """CPU seconds of a process and its live descendants (prefork children included). A
    descendant that exits meanwhile is left out: once reaped, its CPU is in its parent's
    (cutime, cstime)."""
    total = 0.0
    for p in tree_pids(pid):
        try:
            total += cpu_s(p)
        except OSError:  # exited between the listing and the read
            continue
    return total


def rss_mb(pid: int) -> float:
    """Resident memory of a process, in MB (VmRSS of /proc/PID/status)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"process {pid} has no VmRSS (a zombie?)")


def connections_to(pid: int, port: int) -> int:
    """TCP connections the process holds to `port` (any address): its socket inodes
    matched against /proc/PID/net/tcp and tcp6."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:  # closed meanwhile
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    count = 0
    for table in ("tcp", "tcp6"):
        for line in Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]:
            fields = line.split()
            if int(fields[2].rsplit(":", 1)[1], 16) == port and fields[9] in inodes:
                count += 1
    return count


def machine_cpu_s() -> tuple[float, float]:
    """Busy and total CPU seconds of the whole machine so far, summed over its cores (the
    first line of /proc/stat; idle and iowait count as not busy)."""
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    total = sum(fields)  # user nice system idle iowait irq softirq steal (guest is in user)
    return (total - fields[3] - fields[4]) / TICKS, total / TICKS


def free_port() -> int:
    """A TCP port on 127.0.0.1 nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def postmaster_pid(pg: psycopg.Connection[Any]) -> int | None:
    """The local Postgres server's postmaster (the parent of this connection's backend),
    whose process tree holds every backend: its CPU is the server's. None when the
    server is not on this machine (the backend's pid is not ours to read)."""
    backend = pg.execute("SELECT pg_backend_pid()").fetchone()
    try:
        stat = Path(f"/proc/{backend[0] if backend else 0}/stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[1])
