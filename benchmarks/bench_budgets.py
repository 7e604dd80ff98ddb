"""Budget reserve + settle throughput against a plain conditional UPDATE, same Postgres.

    python benchmarks/bench_budgets.py [--seconds 5] [--threads 16] [--repeats 3]
        [--answer-chars 2000] [--settles 2000]

Baseline: `UPDATE ... SET spent = spent + x WHERE spent + x <= limit RETURNING` (one
statement, one commit) on one hot row and on 100 rows. Ours: a full budget cycle per
call, reserve → claim → settle (three operations, each group-committed with the other
threads' in one Postgres statement; a reservation row and a ledger row per call), on one
hot agent and on 100 agents; and the same cycle whose settle keeps the call's journal
entry (AIMESH_DURABLE_ANSWERS: an answer of --answer-chars characters), the two run back
to back, each first in turn; and, on one thread, the median time of one settle without
and with the entry, alternating call by call. Medians over the repeats; the last line
is JSON. Uses the Postgres database aimesh_bench (created if missing; AIMESH_BENCH_DBS
moves it: benchmarks/places.py).
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
from benchmarks.places import BENCH_DB  # noqa: E402, I001

import psycopg  # noqa: E402
from sqlalchemy import text  # noqa: E402

from aimesh_tasks.budgets import claim, reserve, set_budget, settle  # noqa: E402
from aimesh_tasks.budgets.estimate import Estimate  # noqa: E402
from aimesh_tasks.db import get_engine  # noqa: E402
from aimesh_tasks.pipeline import journal  # noqa: E402
from aimesh_tasks.providers.base import Completion  # noqa: E402
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


def ours_op(ids: list[str], entry: dict[str, Any] | None = None
            ) -> Callable[[random.Random], bool]:
    """reserve → claim → settle of one call (keeping `entry` with the settlement)."""
    def op(rng: random.Random) -> bool:
        agent = ids[rng.randrange(len(ids))]
        key = uuid.uuid4().hex
        reserve(agent, key, "bench", key, NEED)
        claim(key)
        return settle(key, 60, 600, entry=entry)
    return op


def answer_entry(chars: int) -> dict[str, Any]:
    """A call's journal entry with an answer of `chars` characters (pipeline/journal.py)."""
    words = " ".join(random.Random(0).choice(("queue", "ledger", "answer", "budget", "call"))
                     for _ in range(chars // 6 + 1))[:chars]
    completion = Completion(text=words, input_tokens=40, output_tokens=chars // 4,
                            model="sim-model", finish_reason="stop",
                            request_id=uuid.uuid4().hex)
    return dict(journal.answered(completion, 600))


def settle_latencies_us(ids: list[str], entry: dict[str, Any], calls: int
                        ) -> tuple[float, float]:
    """Median wall time of one settle (µs), without and with `entry` kept, one thread,
    the two alternating call by call so that a machine's changing load hits both alike."""
    times: tuple[list[float], list[float]] = ([], [])
    for n in range(calls):
        key = uuid.uuid4().hex
        reserve(ids[n % len(ids)], key, "bench", key, NEED)
        claim(key)
        started = time.perf_counter()
        settle(key, 60, 600, entry=entry if n % 2 else None)
        times[n % 2].append((time.perf_counter() - started) * 1e6)
    return statistics.median(times[0]), statistics.median(times[1])


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
    parser.add_argument("--answer-chars", type=int, default=2000)
    parser.add_argument("--settles", type=int, default=2000,
                        help="single-thread settles timed, alternating without/with")
    args = parser.parse_args()
    prepare_database()
    entry = answer_entry(args.answer_chars)
    figures: dict[str, float] = {}
    for label, rows in (("hot", 1), ("spread", 100)):
        base, ours, kept = [], [], []
        ids = ours_setup(rows)
        for n in range(args.repeats):
            baseline_setup(rows)
            base.append(run_for(args.seconds, args.threads, baseline_op(rows)))
            pair = [(ours, None), (kept, entry)]  # each first in turn: the tables grow
            for series, kept_entry in (pair if n % 2 else pair[::-1]):
                series.append(run_for(args.seconds, args.threads, ours_op(ids, kept_entry)))
            print(f"{label}: baseline {base[-1]:.0f} ops/s, reserve+settle {ours[-1]:.0f}/s, "
                  f"keeping the answer {kept[-1]:.0f}/s", flush=True)
        figures[f"{label}_baseline_ops_s"] = round(statistics.median(base), 1)
        figures[f"{label}_reserve_settle_ops_s"] = round(statistics.median(ours), 1)
        figures[f"{label}_ratio"] = round(statistics.median(ours) / statistics.median(base), 3)
        figures[f"{label}_kept_ops_s"] = round(statistics.median(kept), 1)
        figures[f"{label}_kept_ratio"] = round(statistics.median(kept)
                                               / statistics.median(ours), 3)
    plain_us, kept_us = settle_latencies_us(ids, entry, args.settles)
    figures["settle_p50_us"] = round(plain_us, 1)
    figures["settle_kept_p50_us"] = round(kept_us, 1)
    figures["overspent_budgets"] = overspent()
    figures["threads"] = args.threads
    figures["answer_chars"] = args.answer_chars
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
