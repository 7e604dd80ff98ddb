"""Reserve, claim and settle in Postgres batches: each is one operation of the function
`budget_apply` (migration 0010), and the operations that a process's threads make at the
same time share one transaction and one commit (group commit, group_commit.py).

Why group commit (issue 18, goal 4). A hot agent's cost was its budget row's lock held
across each commit's WAL flush, three transactions per call (reserve, claim, settle:
nine round trips). A batch takes the row lock once, decides its operations in arrival
order, each on the row as the earlier ones left it (as the general path in ledger.py
would), and commits once, in one round trip. The other design, admission in Redis
against an escrow slice granted from Postgres with a write-behind ledger, takes
Postgres off the path but moves the truth out of it: a lost Redis must be reconciled
against the ledger, spend within a slice is unknown until it is, and a reservation is
no longer a row a redelivered task can find. Group commit was the cheaper prototype, so
it was measured first (benchmarks/bench_budgets.py; figures in docs/design-notes.md):
a hot agent's cycle went from 0.17x to 0.45x one conditional UPDATE at 16 threads and
from 0.37x to 2.3x at 64 threads, its CPU (client and Postgres) from about 7.5 ms
to 1.1-1.3 ms.

Each operation's outcome is one of:
- reserve: reserved | held (this call key is reserved or settled already) | unmetered |
  denied (with the budget's standing, to audit) | general;
- claim: claimed | called_before | settled | released | missing;
- settle: settled (with what is left) | closed (settled or released before) | general.
'general' hands the operation to ledger.py's general path (a released reservation
reserved again, a period that rolled over, a reservation whose budget is gone).

A batch of reservations alone commits without waiting for its WAL flush
(`synchronous_commit` off for that transaction only; ~0.5 ms of a paced reserve's
1.2 ms here, on the router's path to the hand-off). A reservation has to survive a
Postgres crash only once its call may be made, and the call's claim commits
synchronously, which flushes the WAL up to it, the reservation included. A reservation
that a crash takes back (the last fraction of a second before it) takes its hold on the
budget with it, in the same transaction, and leaves the call's claim `missing`: the call
task then reserves again, against the budget as it stands then, before anything is
called (pipeline/call.py `_take_over`); if that one is denied, the message fails as
budget exhausted, uncalled. A batch with a claim or a settle waits for its flush as
before: a claim is what says a call may have been made, a settle is the charge.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Sequence
from typing import Any, Literal, NotRequired, TypedDict

import psycopg
from sqlalchemy.exc import DBAPIError

from aimesh_tasks.budgets.group_commit import GroupCommit
from aimesh_tasks.db import get_engine
from aimesh_tasks.db.engine import autocommit_connection


class Standing(TypedDict):
    """A budget as it stood when a reservation did not fit (what a denial audits)."""

    agent_id: str
    token_limit: int | None
    usd_limit_nusd: int | None
    spent_tokens: int
    spent_nusd: int
    reserved_tokens: int
    reserved_nusd: int


class ReserveOp(TypedDict):
    """Hold `tokens` / `nusd` for one call against the agent's budget."""

    op: Literal["reserve"]
    call_key: str
    agent_id: str
    message_id: str
    endpoint_id: str
    tokens: int
    nusd: int


class ClaimOp(TypedDict):
    """Mark the call as about to be made."""

    op: Literal["claim"]
    call_key: str


class SettleOp(TypedDict):
    """Charge the call's actual usage and write its ledger row; keep `entry`, the call's
    journal entry, with the settlement (migration 0008, pipeline/durable.py)."""

    op: Literal["settle"]
    call_key: str
    tokens: int
    nusd: int
    kind: str
    entry: NotRequired[dict[str, Any]]


Op = ReserveOp | ClaimOp | SettleOp


class Outcome(TypedDict, total=False):
    """What budget_apply decided for one operation (`outcome` always set)."""

    outcome: str
    tokens: int  # held: what the existing reservation holds
    nusd: int
    state: str
    reason: str  # denied: 'exhausted' or 'expired'
    standing: Standing
    agent_id: str  # settled: the agent, and what its budget has left (None: no limit)
    tokens_left: int | None
    nusd_left: int | None


_APPLY = "SELECT budget_apply(%s::jsonb, %s::jsonb, %s::jsonb)"  # reserves, claims, settles
# The same, for a batch of reservations only: its commit does not wait for the WAL flush
# (the setting is the statement's transaction's, read when it commits; module notes).
_APPLY_RESERVES = _APPLY + ", set_config('synchronous_commit', 'off', true)"
_DEADLOCK = "40P01"
_ATTEMPTS = 3


def available() -> bool:
    """True when the database is Postgres (SQLite has only the general path)."""
    return get_engine().dialect.name == "postgresql"


def _distinct_runs(ops: Sequence[Op]) -> list[Sequence[Op]]:
    """The batch cut where a call key comes again (two deliveries of one call), so that
    each call of budget_apply names a key once and sees what the earlier ones did."""
    runs: list[Sequence[Op]] = []
    start, seen = 0, set[str]()
    for n, op in enumerate(ops):
        if op["call_key"] in seen:
            runs.append(ops[start:n])
            start, seen = n, set[str]()
        seen.add(op["call_key"])
    runs.append(ops[start:])
    return runs


def statement_for(ops: Sequence[Op]) -> str:
    """The statement that applies `ops`: a batch of reservations only may commit without
    waiting for the WAL flush; any other waits for it (module notes)."""
    return _APPLY_RESERVES if all(op["op"] == "reserve" for op in ops) else _APPLY


def _apply_run(connection: psycopg.Connection[Any], ops: Sequence[Op],
               statement: str | None = None) -> list[Outcome]:
    """One call of budget_apply for `ops` (each call key once), by `statement` (by
    default the one for `ops` alone)."""
    statement = statement or statement_for(ops)
    by_kind: dict[str, list[Op]] = {"reserve": [], "claim": [], "settle": []}
    for op in ops:
        by_kind[op["op"]].append(op)
    row = connection.execute(statement, [json.dumps(listed) for listed in by_kind.values()]
                             ).fetchone()
    assert row is not None
    decided: dict[str, list[Outcome]] = row[0]
    position = dict.fromkeys(by_kind, 0)
    outcomes = []
    for op in ops:
        outcomes.append(decided[op["op"]][position[op["op"]]])
        position[op["op"]] += 1
    return outcomes


PARALLEL_BATCHES = 2  # one committing, the next already waiting for its rows in Postgres
OVERLAP_AT = 4  # operations waiting before the second goes (group_commit.py)
_groups: dict[int, GroupCommit[Op, Outcome]] = {}
_groups_lock = threading.Lock()


def _group() -> GroupCommit[Op, Outcome]:
    """This process's queue (a forked child gets its own, never its parent's)."""
    pid = os.getpid()
    group = _groups.get(pid)
    if group is None:
        with _groups_lock:
            group = _groups.setdefault(pid, GroupCommit(apply, parallel=PARALLEL_BATCHES,
                                                               overlap_at=OVERLAP_AT))
    return group


def apply(ops: Sequence[Op]) -> list[Outcome]:
    """Apply `ops` now, in one transaction; one outcome each, in order. Usually one
    statement in autocommit: one round trip, the commit included. A deadlock with another
    process's batch (budget rows are locked in agent order, so only a call key raced by
    two deliveries can cause one) rolls the batch back whole, and it is tried again."""
    runs = _distinct_runs(ops)
    # Decided for the whole batch: runs share one transaction, whose commit is the last.
    statement = statement_for(ops)
    attempt = 1
    while True:
        try:
            with autocommit_connection() as connection:
                if len(runs) == 1:
                    return _apply_run(connection, ops, statement)
                with connection.transaction():
                    return [o for run in runs for o in _apply_run(connection, run, statement)]
        except DBAPIError as exc:
            if attempt == _ATTEMPTS or getattr(exc.orig, "sqlstate", None) != _DEADLOCK:
                raise
            attempt += 1


def run(op: Op) -> Outcome:
    """Apply one operation together with whatever this process's other threads are
    applying (group commit); its outcome. Errors (a lost connection, a lock timeout) are
    the whole batch's."""
    return _group().run(op)
