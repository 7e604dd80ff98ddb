"""The fault matrix at full size: every row against servers this script starts and kills.

    python benchmarks/chaos.py [--rows kill-route,redis-pause,...] [--messages 200]
        [--fault-scale 1.0] [--redis-port 16400] [--postgres-port 15440] [--json FILE]
    python benchmarks/chaos.py --list

Starts its own redis-server and Postgres (initdb + pg_ctl in a temporary directory) on
the given ports, and for every row fresh simulators, endpoints, metered agents and
worker subprocesses (a prefork `celery worker` router, an `aimesh worker` for the
endpoints); injects the row's fault under load; waits for every accepted message's
terminal result, the outbox and the reaper; and prints a table: messages, refused at
submit, lost, failed, double charges, spend (exact, flagged, or wrong), reservations
left open, deduplication, time to drain — then what broke, row by row. The exit status
is 1 if any row broke an invariant. Nothing outside the script's own processes is
signalled. Rows and their faults: benchmarks/chaos/rows_*.py.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.chaos.cluster import process_env  # noqa: E402  (imports no aimesh_tasks)
from benchmarks.chaos.servers import port_open  # noqa: E402


def _arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", default="", help="comma-separated row names (default all)")
    parser.add_argument("--messages", type=int, default=200, help="messages per row")
    parser.add_argument("--fault-scale", type=float, default=1.0,
                        help="multiplies outage durations (30 s pause, 15 s stop, ...)")
    parser.add_argument("--redis-port", type=int, default=16400)
    parser.add_argument("--postgres-port", type=int, default=15440)
    parser.add_argument("--json", default="", help="also write the reports to this file")
    parser.add_argument("--list", action="store_true", help="list the rows and exit")
    return parser.parse_args()


def main() -> int:
    args = _arguments()
    for port in (args.redis_port, args.postgres_port):
        if port_open(port):
            sys.exit(f"port {port} is in use: give --redis-port/--postgres-port")
    os.environ.update(process_env(args.redis_port, args.postgres_port))  # before aimesh reads

    from benchmarks.chaos.cluster import Cluster
    from benchmarks.chaos.report import table
    from benchmarks.chaos.rows import ROWS
    from benchmarks.chaos.runner import run_row

    if args.list:
        print("\n".join(f"{row.name:22} {row.title}" for row in ROWS.values()))
        return 0
    names = [n for n in args.rows.split(",") if n] or list(ROWS)
    unknown = [n for n in names if n not in ROWS]
    if unknown:
        sys.exit(f"--rows: unknown {unknown}; known: {', '.join(ROWS)}")
    workdir = Path(tempfile.mkdtemp(prefix="aimesh-chaos-"))
    workdir.chmod(0o755)  # Postgres runs as its own user and must reach its directory
    cluster = Cluster(workdir, args.redis_port, args.postgres_port)
    reports = []
    started = time.monotonic()
    try:
        cluster.start()
        for name in names:
            print(f"row {name} ...", file=sys.stderr, flush=True)
            reports.append(run_row(cluster, ROWS[name], args.messages, args.fault_scale))
            print(f"  {'ok' if reports[-1].ok else 'BROKEN'} "
                  f"({time.monotonic() - started:.0f} s so far)", file=sys.stderr, flush=True)
    finally:
        cluster.stop()
    print(f"python benchmarks/chaos.py --messages {args.messages} --fault-scale "
          f"{args.fault_scale:g} ({time.monotonic() - started:.0f} s; logs in {workdir})\n")
    print(table(reports))
    if args.json:
        Path(args.json).write_text(json.dumps([r.to_json() for r in reports], indent=2))
    return 0 if all(r.ok for r in reports) else 1


if __name__ == "__main__":
    sys.exit(main())
