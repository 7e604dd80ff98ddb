"""The servers a benchmark measures, and the simulator it drives.

- `redis_server(port)`: a redis-server of the benchmark's own, so that INFO counts only its
  traffic and its CPU is one process's (the shared 6379 serves other jobs too);
- `redis_figures` and `pg_figures`: what Redis and the benchmark's Postgres database did
  so far (commands, bytes, CPU; transactions, rows, the CPU of the backends serving it);
- `key_census`: the keys a Redis db holds, by pattern, and their bytes;
- `Simulator`: the simulator process's control endpoints.

Importing it starts nothing and sets nothing (benchmarks/places.py reads the Redis URL
when it is imported, so a benchmark chooses its port first).
"""

from __future__ import annotations

import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import httpx
import psycopg
import redis

from benchmarks.procfs import cpu_s

# What varies between keys of one kind: uuids, hex digests, numbers.
KEY_ID = re.compile(r"[0-9a-f]{8}(?:-[0-9a-f]{4}){3}-[0-9a-f]{12}|[0-9a-f]{16,}|\d+")


@contextmanager
def redis_server(port: int) -> Iterator[tuple[redis.Redis, int]]:
    """A redis-server on 127.0.0.1:`port` (no persistence) while the block runs: a client
    and the server's pid."""
    directory = tempfile.mkdtemp(prefix="aimesh-bench-redis-")
    server = subprocess.Popen(
        ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--dir", directory,
         "--save", "", "--appendonly", "no", "--protected-mode", "no"],
        stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        client = redis.Redis(port=port)
        for _ in range(200):
            try:
                client.ping()
                break
            except redis.ConnectionError:
                time.sleep(0.05)
        yield client, server.pid
    finally:
        server.terminate()
        server.wait(30)
        shutil.rmtree(directory, ignore_errors=True)


def redis_figures(client: redis.Redis) -> dict[str, Any]:
    """Commands (in all and by name), reads (socket reads it processed: about one per
    client round trip), bytes in/out and CPU seconds of the Redis server so far."""
    stats = client.info("stats")
    by_command = {k.removeprefix("cmdstat_"): int(v["calls"])
                  for k, v in client.info("commandstats").items()}
    cpu = client.info("cpu")
    return {"commands": sum(by_command.values()), "by_command": by_command,
            "reads": int(stats.get("total_reads_processed", 0)),
            "bytes_in": int(stats["total_net_input_bytes"]),
            "bytes_out": int(stats["total_net_output_bytes"]),
            "cpu_s": float(cpu["used_cpu_user"]) + float(cpu["used_cpu_sys"])}


def key_census(client: redis.Redis, sample: int = 20) -> dict[str, dict[str, int]]:
    """The keys of the client's db by pattern (ids as *): how many, their bytes (MEMORY
    USAGE of up to `sample` keys of each, scaled to all) and the longest TTL left among
    those (-1: no expiry), which with the bytes says what a steady rate keeps in memory."""
    keys: dict[str, list[bytes]] = {}
    for key in client.scan_iter(count=1000):
        keys.setdefault(KEY_ID.sub("*", key.decode(errors="replace")), []).append(key)
    census = {}
    for pattern, found in keys.items():
        some = found[:sample]
        sized = sum(int(client.memory_usage(k, samples=0) or 0) for k in some)
        census[pattern] = {"keys": len(found), "bytes": sized * len(found) // len(some),
                           "ttl_s": max(int(client.ttl(k)) for k in some)}
    return dict(sorted(census.items(), key=lambda kv: -kv[1]["bytes"]))


def pg_figures(conn: psycopg.Connection[Any], database: str) -> dict[str, Any]:
    """Transactions and rows written in `database` so far (pg_stat_database: a backend
    reports its counts up to a second late), and the CPU seconds of each backend serving
    it now but `conn`'s (an autocommit connection kept for these reads), by pid (the
    server runs on this machine)."""
    row = conn.execute(
        "SELECT xact_commit + xact_rollback, tup_inserted, tup_updated, tup_deleted "
        "FROM pg_stat_database WHERE datname = %s", (database,)).fetchone()
    pids = [int(r[0]) for r in conn.execute(
        "SELECT pid FROM pg_stat_activity WHERE datname = %s AND pid <> pg_backend_pid()",
        (database,))]
    assert row is not None, f"no database {database}"
    backends = {}
    for pid in pids:
        try:
            backends[pid] = cpu_s(pid)
        except OSError:  # exited meanwhile
            pass
    return {"transactions": int(row[0]), "rows_inserted": int(row[1]),
            "rows_updated": int(row[2]), "rows_deleted": int(row[3]),
            "backend_cpu_s": backends}


def backend_cpu_between(before: dict[str, Any], after: dict[str, Any]) -> float:
    """CPU seconds the backends spent between two pg_figures: those alive at the end (a
    backend that started meanwhile counts from zero; one that ended meanwhile is lost:
    the pools keep theirs open)."""
    start: dict[int, float] = before["backend_cpu_s"]
    end: dict[int, float] = after["backend_cpu_s"]
    return sum(cpu - start.get(pid, 0.0) for pid, cpu in end.items())


class Simulator:
    """The simulator process's control endpoints."""

    def __init__(self, url: str, log: str = "its log") -> None:
        self.url = url
        self.log = log
        self._http = httpx.Client(base_url=url, timeout=30)

    def configure(self, **fields: Any) -> None:
        self._http.post("/_sim/config", json=fields).raise_for_status()

    def reset(self) -> None:
        self._http.post("/_sim/reset").raise_for_status()

    def in_flight(self) -> dict[str, int]:
        figures: dict[str, int] = self._http.get("/_sim/in_flight").json()
        return figures

    def wait_up(self) -> None:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                self._http.get("/health").raise_for_status()
                return
            except httpx.HTTPError:
                time.sleep(0.1)
        raise RuntimeError(f"the simulator at {self.url} did not start (see {self.log})")

