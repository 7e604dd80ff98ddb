"""Budget reserve + settle throughput against a plain conditional UPDATE, same Postgres.

    python benchmarks/bench_budgets.py [--seconds 5] [--threads 16] [--repeats 3]

Baseline: `UPDATE ... SET spent = spent + x WHERE spent + x <= limit RETURNING` (one
statement, one commit) on one hot row and on 100 rows. Ours: a full budget cycle per
call, reserve → claim → settle (three operations, each group-committed with the other
threads' in one Postgres statement; a reservation row and a ledger row per call), on one
hot agent and on 100 agents. Medians over the repeats; the last line is JSON. Uses the
Postgres database aimesh_bench (created if missing; AIMESH_BENCH_DBS moves it:
benchmarks/places.py).
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

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
# Redis dbs and the Postgres database by AIMESH_BENCH_DBS (benchmarks/places.py).
from benchmarks.places import BENCH_DB  # noqa: E402, I001

import psycopg  # noqa: E402
from sqlalchemy import text  # noqa: E402

from aimesh_tasks.budgets import claim, reserve, set_budget, settle  # noqa: E402
from aimesh_tasks.budgets.estimate import Estimate  # noqa: E402
from aimesh_tasks.db import get_engine  # noqa: E402
from benchmarks.bench_spine import prepare_database  # noqa: E402

NEED = Estimate(input_tokens=50, output_tokens=50, nusd=1000)


def run_for(seconds: float, threads: int, op: Callable[[random.Random], bool]) -> float:
    """Operations per second of `op` run by `threads` threads for `seconds`."""
    counts = [0] * threads
    stop = time.monotonic() + seconds

    def loop(i: int) -> None:
        rng = random.Random(i)
        while time.monotonic() < stop:
            if op(rng):
                counts[i] += 1

    workers = [threading.Thread(target=loop, args=(i,)) for i in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    return sum(counts) / seconds


def baseline_setup(rows: int) -> None:
    """A plain table of counters with a huge limit."""
    with get_engine().begin() as c:
        c.execute(text("DROP TABLE IF EXISTS bench_plain"))
        c.execute(text("CREATE TABLE bench_plain (id int primary key, spent bigint, lim bigint)"))
        c.execute(text("INSERT INTO bench_plain SELECT g, 0, 1000000000000 FROM "
                       "generate_series(0, :n) g"), {"n": rows - 1})


def baseline_op(rows: int) -> Callable[[random.Random], bool]:
    """One conditional UPDATE per op, a connection per thread."""
    local = threading.local()

    def op(rng: random.Random) -> bool:
        if not hasattr(local, "conn"):
            local.conn = psycopg.connect(BENCH_DB, autocommit=True)
        row = local.conn.execute(
            "UPDATE bench_plain SET spent = spent + 100 WHERE id = %s AND spent + 100 <= lim "
            "RETURNING spent", (rng.randrange(rows),)).fetchone()
        return row is not None
    return op


def ours_setup(agents: int) -> list[str]:
    """Agents with budgets large enough never to refuse."""
    from aimesh_tasks.governance.agents import add_agent

    tag = uuid.uuid4().hex[:6]
    ids = [f"bench-{tag}-{i}" for i in range(agents)]
    for agent_id in ids:
        add_agent(agent_id)
        set_budget(agent_id, tokens=10**15, usd="1000000")
    return ids


def ours_op(ids: list[str]) -> Callable[[random.Random], bool]:
    """reserve → claim → settle of one call."""
    def op(rng: random.Random) -> bool:
        agent = ids[rng.randrange(len(ids))]
        key = uuid.uuid4().hex
        reserve(agent, key, "bench", key, NEED)
        claim(key)
        return settle(key, 60, 600)
    return op


def overspent() -> int:
    """Budgets whose spent exceeds their limit (must be 0)."""
    with get_engine().connect() as c:
        return int(c.execute(text(
            "SELECT count(*) FROM budgets WHERE spent_tokens > token_limit "
            "OR spent_nusd > usd_limit_nusd")).scalar() or 0)


def main() -> None:
    """Measure and print; JSON last."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=float, default=5)
    parser.add_argument("--threads", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    prepare_database()
    figures: dict[str, float] = {}
    for label, rows in (("hot", 1), ("spread", 100)):
        base, ours = [], []
        ids = ours_setup(rows)
        for _ in range(args.repeats):
            baseline_setup(rows)
            base.append(run_for(args.seconds, args.threads, baseline_op(rows)))
            ours.append(run_for(args.seconds, args.threads, ours_op(ids)))
            print(f"{label}: baseline {base[-1]:.0f} ops/s, reserve+settle {ours[-1]:.0f}/s",
                  flush=True)
        figures[f"{label}_baseline_ops_s"] = round(statistics.median(base), 1)
        figures[f"{label}_reserve_settle_ops_s"] = round(statistics.median(ours), 1)
        figures[f"{label}_ratio"] = round(statistics.median(ours) / statistics.median(base), 3)
    figures["overspent_budgets"] = overspent()
    figures["threads"] = args.threads
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
