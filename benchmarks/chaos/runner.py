"""Running one row: start its parts, inject its fault under load, drain, judge, report.

A row is a `Row`: its workers, simulators and settings, and a `fault(run)` function
that submits the row's messages and does the damage. Everything after the fault is
the same for every row: wait for every accepted message's terminal result (while a
supervisor restarts workers that exited non-zero), for the outbox to reach Postgres,
for the reaper to close what it will, then read the facts and judge the invariants.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import time
import traceback
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from benchmarks.chaos.cluster import AGENTS, Cluster
from benchmarks.chaos.invariants import Verdict, collect, judge, open_reservations
from benchmarks.chaos.workload import Workload

ROUTER = ["celery", "-Q", "aimesh.route", "-P", "prefork", "-c", "2"]
PREFORK = ["--endpoints", "all", "-P", "prefork", "-c", "3"]
THREADS = ["--endpoints", "all", "-P", "threads", "-c", "8"]
ONE_SIM = {"a": {"latency_ms": 50}}
OUTBOX_BOUND_S = 60
REAPER_WAIT_CAP_S = 150


@dataclass(frozen=True)
class Row:
    """One fault of the matrix."""

    name: str
    title: str
    fault: Callable[[RowRun], None]
    router: list[str] = field(default_factory=lambda: list(ROUTER))
    endpoints: list[str] = field(default_factory=lambda: list(PREFORK))
    sims: dict[str, dict[str, Any]] = field(default_factory=lambda: dict(ONE_SIM))
    env: dict[str, str] = field(default_factory=dict)
    aof: bool = True
    drain_bound_s: float = 150
    audited: bool = True  # accepted ids are messages (audited), not workflow runs


@dataclass
class RowReport:
    """What a row measured and what broke."""

    name: str
    title: str
    messages: int
    refused: dict[str, int]
    failed: dict[str, int]
    drain_s: float | None
    verdict: Verdict | None
    problems: list[str]  # row-specific checks that failed (they break the row too)
    notes: list[str]
    kills: int = 0  # pool children this row SIGKILLed at a phase

    @property
    def ok(self) -> bool:
        """Every invariant held and no row-specific check failed."""
        return (self.verdict is not None and all(self.verdict.holds().values())
                and not self.problems)

    def to_json(self) -> dict[str, Any]:
        """The report as JSON-ready data."""
        verdict = self.verdict
        return {
            "row": self.name, "title": self.title, "ok": self.ok, "messages": self.messages,
            "refused": self.refused, "failed": self.failed, "drain_s": self.drain_s,
            "lost": len(verdict.lost) if verdict else None,
            "double_charged": len(verdict.double_charged) if verdict else None,
            "spend": verdict.spend() if verdict else None,
            "flagged": dict(verdict.flagged) if verdict else None,
            "open_reservations": verdict.open_reservations if verdict else None,
            "extra_calls": len(verdict.extra_calls) if verdict else None,
            "kills": self.kills,
            "holds": verdict.holds() if verdict else None,
            "broken": [*(verdict.broken() if verdict else ["no verdict"]), *self.problems],
            "notes": self.notes,
        }


class RowRun:
    """What a row's fault function works with."""

    def __init__(self, cluster: Cluster, work: Workload, size: int, fault_scale: float) -> None:
        self.cluster = cluster
        self.work = work
        self.size = size
        self.fault_scale = fault_scale
        self.notes: list[str] = []
        self.problems: list[str] = []
        self.after: list[Callable[[], None]] = []  # row checks to run once drained
        self.kills: list[str] = []  # what kill_child killed, and why

    def fault_s(self, full_s: float) -> float:
        """A fault's duration: `full_s` at full size, scaled for the suite's short rows."""
        return max(1.0, full_s * self.fault_scale)

    def submit(self, count: int, agents: tuple[str, ...] = AGENTS) -> list[str]:
        """Submit `count` fresh messages; the accepted ids."""
        return self.work.submit(agents, count)

    def wait_finished(self, count: int, bound_s: float = 120) -> bool:
        """Wait until `count` messages have a terminal result (False, noted, if not)."""
        if self.work.wait_finished(count, bound_s, self.cluster.supervise):
            return True
        self.notes.append(f"only {self.work.finished()} of {count} finished in {bound_s:g} s")
        return False

    def wait(self, probe: Callable[[], Any], what: str, bound_s: float = 90) -> Any:
        """Wait for `probe` to return something true; RuntimeError naming `what`."""
        deadline = time.monotonic() + bound_s
        while not (found := probe()):
            if time.monotonic() > deadline:
                raise RuntimeError(f"waited {bound_s:g} s for {what}")
            self.cluster.supervise()
            time.sleep(0.05)
        return found

    def kill_child(self, pid: int, why: str) -> None:
        """SIGKILL `pid`, which must be a pool process of one of this row's workers."""
        owners = [w for w in self.cluster.workers if pid in w.children()]
        if not owners:
            raise RuntimeError(f"pid {pid} ({why}) is not a child of this row's workers")
        os.kill(pid, signal.SIGKILL)
        self.kills.append(why)


def run_row(cluster: Cluster, row: Row, size: int, fault_scale: float) -> RowReport:
    """Run one row on the cluster and report it."""
    cluster.start_row(aof=row.aof, sims={k: dict(v) for k, v in row.sims.items()},
                      workers={"router": row.router, "endpoints": row.endpoints},
                      env=row.env)
    work = Workload(row.name)
    run = RowRun(cluster, work, size, fault_scale)
    drain_s: float | None = None
    verdict: Verdict | None = None
    try:
        row.fault(run)
        drain_s = work.drain(row.drain_bound_s, cluster.supervise)
        _settle_down(run)
        for check in run.after:
            check()
        facts = collect(_engine(), work.outcomes(), cluster.endpoints.logs())
        run.notes.append(_provider_note(facts))
        _dump(cluster, row, facts)
        verdict = judge(facts, audited=row.audited)
    except Exception as exc:  # the row could not finish: report what is known
        run.problems.append(f"row aborted: {type(exc).__name__}: {exc}")
        run.notes.append(traceback.format_exc(limit=3).strip().splitlines()[-1])
    finally:
        if run.kills:
            run.notes.append(f"{len(run.kills)} pool children SIGKILLed ({run.kills[0]}, ...)")
        run.notes.extend(f"{kind} at submit: {text}" for kind, text in work.refusals.items())
        run.notes.extend(cluster.supervised)
        run.notes.extend(_worker_notes(cluster))
        cluster.end_row()
    failed = dict(work.errors)
    return RowReport(row.name, row.title, len(work.accepted), dict(work.refused), failed,
                     drain_s, verdict, run.problems, run.notes, len(run.kills))


def _engine() -> Any:
    from aimesh_tasks.db import get_engine

    return get_engine()


def _settle_down(run: RowRun) -> None:
    """Wait for the simulators to answer what they began, the outbox to reach Postgres
    and the reaper to close reservations (bounded by one reservation timeout and a few
    reaper intervals)."""
    from aimesh_tasks import keys
    from aimesh_tasks.redis_client import get_redis

    try:  # a call still being answered is billed once it is: wait for its log line
        run.wait(lambda: run.cluster.endpoints.in_flight() == 0, "the simulators to answer "
                 "every request they began", OUTBOX_BOUND_S)
    except RuntimeError as exc:
        run.notes.append(str(exc))
    try:
        run.wait(lambda: get_redis().llen(keys.outbox()) == 0, "the outbox to drain",
                 OUTBOX_BOUND_S)
    except RuntimeError as exc:
        run.notes.append(str(exc))
    env = run.cluster.workers[0].env
    bound = min(float(env["AIMESH_RESERVATION_TIMEOUT_S"])
                + 3 * float(env["AIMESH_REAPER_INTERVAL_S"]) + 5, REAPER_WAIT_CAP_S)
    try:
        run.wait(lambda: open_reservations(_engine()) == 0, "reservations to close", bound)
    except RuntimeError:
        run.notes.append(f"reservations still open {bound:g} s after the drain "
                         "(reservation timeout + 3 reaper intervals)")


def _dump(cluster: Cluster, row: Row, facts: Any) -> None:
    """Keep the row's facts beside its logs, for reading what broke afterwards."""
    path = cluster.workdir / f"{row.name}-facts.json"
    data = {**vars(facts), "calls": [dataclasses.asdict(c) for c in facts.calls],
            "charges": [dataclasses.asdict(c) for c in facts.charges],
            "audits": {m: dict(events) for m, events in facts.audits.items()}}
    path.write_text(json.dumps(data, indent=1, default=str))


def _provider_note(facts: Any) -> str:
    statuses: dict[str, Counter[int]] = {}
    for call in facts.calls:
        statuses.setdefault(call.endpoint_id.rsplit("-", 1)[0], Counter())[call.status] += 1
    shown = "; ".join(f"{name}: {dict(sorted(c.items()))}" for name, c in sorted(statuses.items()))
    return f"provider calls by status: {shown or 'none'}"


def _worker_notes(cluster: Cluster) -> list[str]:
    notes = []
    recalled = 0
    for worker in cluster.workers:
        log = worker.log.read_text(errors="replace") if worker.log.exists() else ""
        if "Unrecoverable error" in log:
            line = next(x for x in log.splitlines() if "Unrecoverable error" in x)
            notes.append(f"{worker.name}: {line.strip()[:200]}")
        recalled += log.count("durable.recalled")
    if recalled:  # calls Redis had forgotten, answered from their settlement, not made again
        notes.append(f"{recalled} calls recalled from their settlement (durable.recalled)")
    return notes
