"""How far the other budget design could go, before building it (issue 18, goal 4).

    python benchmarks/bench_escrow.py [--seconds 5] [--threads 16] [--repeats 3]

The issue names two designs for budgets faster than one conditional UPDATE: group
commit in Postgres (built: budgets/pg_batch.py) and admission in Redis against an escrow
slice granted from Postgres, with a write-behind ledger. This measures the second's
ceiling on this machine, one hot agent, each row in the same run:
- baseline: bench_budgets' conditional UPDATE (one statement and one commit per
  operation, a connection per thread);
- group commit: the product's reserve → claim → settle cycle (bench_budgets' ours_op);
- escrow ceiling: the same three steps as one Redis call each against a slice held in
  Redis (reserve: a Lua script takes the estimate from the slice if it covers it and
  records the reservation; claim: HSETNX; settle: a script gives back what the call did
  not use, marks the reservation settled and queues its ledger row), and a writer
  thread moving the queued ledger rows into Postgres (budget_ledger, its indexes
  included), many per transaction, with the budget's spent. Its cycles/s are counted
  until the writer has caught up, so a writer that falls behind costs the row.

What the ceiling leaves out is what would make it safe, and costs more: granting a
new slice from Postgres when one runs out (a row lock and a commit per grant, rare with
large slices), the reconciliation after a lost Redis (the granted slices stay charged in
Postgres until then, so no overspend beyond them, but their spend is unknown until the
ledger rows are recovered or the slices charged whole), a reservation row a redelivered
task can find in Postgres, and the reaper. So the real design lands below this line.
Prints one line per repeat, JSON last (medians).
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
# Redis dbs and the Postgres database by AIMESH_BENCH_DBS (benchmarks/places.py).
from benchmarks.places import BENCH_DB, LIVE_DB, REDIS  # noqa: E402, I001

import psycopg  # noqa: E402
import redis  # noqa: E402

from benchmarks.bench_budgets import (  # noqa: E402
    NEED,
    baseline_op,
    baseline_setup,
    ours_op,
    ours_setup,
    run_for,
)
from benchmarks.bench_spine import prepare_database  # noqa: E402
from benchmarks.procfs import postmaster_pid, tree_cpu_s  # noqa: E402

RESERVE = """
local held = redis.call('HMGET', KEYS[1], 'tokens', 'nusd')
if redis.call('EXISTS', KEYS[2]) == 1 then return 2 end
if tonumber(held[1]) < tonumber(ARGV[1]) or tonumber(held[2]) < tonumber(ARGV[2]) then
  return 0
end
redis.call('HINCRBY', KEYS[1], 'tokens', -ARGV[1])
redis.call('HINCRBY', KEYS[1], 'nusd', -ARGV[2])
redis.call('HSET', KEYS[2], 'tokens', ARGV[1], 'nusd', ARGV[2], 'state', 'reserved')
return 1
"""

SETTLE = """
local held = redis.call('HMGET', KEYS[2], 'tokens', 'nusd', 'state')
if not held[1] or held[3] ~= 'reserved' then return 0 end
redis.call('HINCRBY', KEYS[1], 'tokens', held[1] - ARGV[1])
redis.call('HINCRBY', KEYS[1], 'nusd', held[2] - ARGV[2])
redis.call('HSET', KEYS[2], 'state', 'settled')
redis.call('EXPIRE', KEYS[2], 86400)
redis.call('RPUSH', KEYS[3], ARGV[3])
return 1
"""

WRITE_LEDGER = """
WITH r AS (SELECT * FROM jsonb_to_recordset(%s::jsonb)
           AS x(call_key text, agent_id text, tokens bigint, nusd bigint)),
ins AS (INSERT INTO budget_ledger
          (call_key, agent_id, message_id, endpoint_id, tokens, nusd, kind, created_at)
        SELECT call_key, agent_id, call_key, 'bench', tokens, nusd, 'escrow', now() FROM r)
UPDATE budgets b SET spent_tokens = b.spent_tokens + s.tokens,
                     spent_nusd = b.spent_nusd + s.nusd, updated_at = now()
FROM (SELECT agent_id, sum(tokens) AS tokens, sum(nusd) AS nusd FROM r GROUP BY agent_id) s
WHERE b.agent_id = s.agent_id
"""
WRITER_BATCH = 500


class Escrow:
    """One hot agent's slice in Redis, its reservations, and the write-behind ledger."""

    def __init__(self, agent_id: str, threads: int) -> None:
        # a connection for each thread and the writer
        self.client = redis.Redis.from_url(f"{REDIS}/{LIVE_DB}", max_connections=threads + 1)
        self.agent_id = agent_id
        self.slice = f"bench:escrow:{uuid.uuid4().hex[:8]}"
        self.queue = f"{self.slice}:ledger"
        self.client.hset(self.slice, mapping={"tokens": 10**15, "nusd": 10**15})
        self.reserve_script = self.client.register_script(RESERVE)
        self.settle_script = self.client.register_script(SETTLE)
        self._stop = threading.Event()
        self._writer = threading.Thread(target=self._write, daemon=True)
        self._writer.start()

    def cycle(self, _rng: random.Random) -> bool:
        key = f"{self.slice}:r:{uuid.uuid4().hex}"
        if self.reserve_script(keys=[self.slice, key], args=[NEED.tokens, NEED.nusd]) != 1:
            return False
        self.client.hsetnx(key, "called", 1)  # the claim
        row = json.dumps({"call_key": key.rsplit(":", 1)[1], "agent_id": self.agent_id,
                          "tokens": 60, "nusd": 600})
        return bool(self.settle_script(keys=[self.slice, key, self.queue],
                                       args=[60, 600, row]))

    def _write(self) -> None:
        with psycopg.connect(BENCH_DB, autocommit=True) as connection:
            while not self._stop.is_set() or self.client.llen(self.queue):
                rows = self.client.lpop(self.queue, WRITER_BATCH)
                if not rows:
                    time.sleep(0.002)
                    continue
                connection.execute(WRITE_LEDGER, [(b"[" + b",".join(rows) + b"]").decode()])

    def drain(self) -> float:
        """Seconds until the writer has written every queued ledger row."""
        started = time.perf_counter()
        self._stop.set()
        self._writer.join()
        return time.perf_counter() - started


def escrow_run(seconds: float, threads: int, agent_id: str) -> tuple[int, float]:
    """Escrow cycles settled, and the seconds until the writer had written them all."""
    escrow = Escrow(agent_id, threads)
    settled = round(run_for(seconds, threads, escrow.cycle) * seconds)
    return settled, seconds + escrow.drain()


def timed(seconds: float, threads: int, op: Callable[[random.Random], bool]
          ) -> tuple[int, float]:
    """Operations done by `threads` threads in `seconds`, and the seconds."""
    return round(run_for(seconds, threads, op) * seconds), seconds


def measured(run: Callable[[], tuple[int, float]], postmaster: int | None,
             server: redis.Redis) -> dict[str, float]:
    """Run `run`: its operations per second, and the CPU ms per operation of this process
    (every thread: the callers and the writer), the Postgres server (every backend) and
    Redis."""
    def redis_cpu_s() -> float:
        info = server.info("cpu")
        return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])

    pg0 = tree_cpu_s(postmaster) if postmaster else 0.0
    client0, redis0 = time.process_time(), redis_cpu_s()
    done, seconds = run()
    per = 1000 / max(done, 1)
    return {"done": done, "per_s": done / seconds,
            "client_ms": (time.process_time() - client0) * per,
            "postgres_ms": ((tree_cpu_s(postmaster) - pg0) * per) if postmaster else -1.0,
            "redis_ms": (redis_cpu_s() - redis0) * per}


def main() -> None:
    """Measure and print; JSON last."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=float, default=5)
    parser.add_argument("--threads", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    prepare_database()
    (agent_id,) = ours_setup(1)
    server = redis.Redis.from_url(f"{REDIS}/{LIVE_DB}")
    with psycopg.connect(BENCH_DB) as connection:
        postmaster = postmaster_pid(connection)
    rows: dict[str, Callable[[], tuple[int, float]]] = {
        "baseline": lambda: timed(args.seconds, args.threads, baseline_op(1)),
        "group_commit": lambda: timed(args.seconds, args.threads, ours_op([agent_id])),
        "escrow_ceiling": lambda: escrow_run(args.seconds, args.threads, agent_id),
    }
    figures: dict[str, list[dict[str, float]]] = {name: [] for name in rows}
    settled = 0  # escrow cycles settled, each of whose ledger rows must be written
    for n in range(args.repeats):
        baseline_setup(1)
        names = list(rows)
        for name in names[n % 3:] + names[:n % 3]:  # each first in turn
            figures[name].append(measured(rows[name], postmaster, server))
        settled += round(figures["escrow_ceiling"][-1].pop("done"))
        print("  ".join(f"{name} {figures[name][-1]['per_s']:.0f}/s" for name in rows),
              flush=True)
    out: dict[str, Any] = {}
    base = statistics.median(f["per_s"] for f in figures["baseline"])
    for name, runs in figures.items():
        for key in ("per_s", "client_ms", "postgres_ms", "redis_ms"):
            out[f"{name}_{key}"] = round(statistics.median(r[key] for r in runs), 3)
        out[f"{name}_ratio"] = round(out[f"{name}_per_s"] / base, 3)
    with psycopg.connect(BENCH_DB) as connection:
        row = connection.execute("SELECT count(*) FROM budget_ledger WHERE agent_id = %s "
                                 "AND kind = 'escrow'", [agent_id]).fetchone()
    out["escrow_settled"], out["escrow_ledger_rows"] = settled, int(row[0]) if row else 0
    out["threads"], out["repeats"] = args.threads, args.repeats
    print(json.dumps(out))


if __name__ == "__main__":
    main()
