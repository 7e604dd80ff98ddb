"""`aimesh demo` as a real subprocess, embedded and against real servers; its report's
figures are recomputed here from the database tables it wrote."""

from __future__ import annotations

import json
import os
import re
import subprocess
from collections import defaultdict
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, create_engine, select
from sqlalchemy.orm import Session

from aimesh_tasks.cli.demo import DEMO_AGENTS, DEMO_ENDPOINTS
from aimesh_tasks.db import AuditRow, CallAttemptRow, RoutingDecisionRow
from aimesh_tasks.registry import list_endpoints
from tests.conftest import DATABASE, TEST_ENV
from tests.processes import AIMESH

pytestmark = pytest.mark.slow
NANO = Decimal(10) ** 9
PRICES = {eid: (Decimal(pin), Decimal(pout)) for eid, pin, pout, _, _ in DEMO_ENDPOINTS}


def _no_aimesh_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("AIMESH_") and k != "DEDUP_TTL_SECS"}
    return {**env, "COLUMNS": "200", **extra}


def _demo(args: list[str], env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    done = subprocess.run([AIMESH, "demo", *args], env=env, cwd=cwd, capture_output=True,
                          text=True, timeout=110)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Traceback" not in done.stderr
    return done


def _cost_nusd(row: CallAttemptRow) -> Decimal:
    price_in, price_out = PRICES[row.endpoint_id]
    exact = (row.input_tokens * price_in + row.output_tokens * price_out) / 1000 * NANO
    return exact.to_integral_value(rounding="ROUND_CEILING")


def _priced_at_each(row: CallAttemptRow, routes: dict[str, list[str]]) -> list[Decimal]:
    """What one answered message's tokens cost at each endpoint eligible for it."""
    return [((row.input_tokens * PRICES[e][0] + row.output_tokens * PRICES[e][1]) / 1000 * NANO
             ).to_integral_value(rounding="ROUND_CEILING") for e in routes[row.message_id]]


def recompute(engine: Engine) -> dict[str, Any]:
    """The demo's figures, straight from the tables."""
    with Session(engine) as session:
        rows = list(session.scalars(select(CallAttemptRow).order_by(CallAttemptRow.id)))
        routes = {d.message_id: [d.winner, *d.fallbacks]
                  for d in session.scalars(select(RoutingDecisionRow)) if d.winner}
        failed = {a.message_id for a in session.scalars(
            select(AuditRow).where(AuditRow.event == "failed"))}
        cached = {a.message_id for a in session.scalars(
            select(AuditRow).where(AuditRow.event == "cached"))}
        denied = {a.message_id for a in session.scalars(
            select(AuditRow).where(AuditRow.event == "denied"))}
    ok = [r for r in rows if r.ok]
    assert all(r.cost_nusd == _cost_nusd(r) for r in rows if r.ok)  # recorded cost = prices
    by_endpoint: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    for r in rows:
        figures = by_endpoint[r.endpoint_id]
        figures["answered" if r.ok else "failed_calls"] += 1
        figures["cost_nusd"] += r.cost_nusd
        figures["output_tokens"] += r.output_tokens
    failed_first = {r.message_id for r in rows if not r.ok}
    per_agent: dict[str, int] = defaultdict(int)
    for r in ok:
        per_agent[r.agent_id] += 1
    return {
        "endpoints": by_endpoint,
        "answered": len({r.message_id for r in ok}),
        "agents": per_agent,
        "failed": len(failed),
        "failed_not_denied": len(failed - denied - {r.message_id for r in ok}),
        "fallbacks": len({r.message_id for r in ok} & failed_first),
        "cached": len(cached),
        "denied": len(denied - {r.message_id for r in ok}),
        "routed_nusd": sum(r.cost_nusd for r in rows),
        "cheapest_nusd": sum(min(_priced_at_each(r, routes)) for r in ok),
        "dearest_nusd": sum(max(_priced_at_each(r, routes)) for r in ok),
    }


def assert_report_matches(report: dict[str, Any], figures: dict[str, Any], sent: int) -> None:
    """Every count and sum of the demo's report equals the recomputed one; every message
    sent was answered by a call, answered without one, or refused by a budget."""
    assert figures["answered"] + figures["cached"] + figures["denied"] == sent
    assert report["total"]["answered"] == figures["answered"]
    assert report["cache"]["answers"] == figures["cached"] > 0  # the demo repeats questions
    assert report["budget_rejections"] == figures["denied"]
    # A message fails only when a budget refuses its fallback (its first call failed, and
    # the next endpoint's reservation no longer fits): it is counted refused, not failed,
    # so the outcomes add up to what was sent.
    assert report["total"]["failed"] == figures["failed_not_denied"] == 0
    assert (report["total"]["answered"] + report["cache"]["answers"] + report["total"]["failed"]
            + report["budget_rejections"]) == sent
    assert report["total"]["fallbacks"] == figures["fallbacks"]
    assert set(report["endpoints"]) == set(figures["endpoints"])
    for endpoint_id, recorded in figures["endpoints"].items():
        shown = report["endpoints"][endpoint_id]
        assert shown["answered"] == recorded["answered"]
        assert shown["failed_calls"] == recorded["failed_calls"]
        assert shown["output_tokens"] == recorded["output_tokens"]
        assert Decimal(shown["cost_usd"]) * NANO == recorded["cost_nusd"]
    assert {a: g["answered"] for a, g in report["agents"].items()} == dict(figures["agents"])
    assert set(report["agents"]) == set(DEMO_AGENTS)
    assert Decimal(report["routed_cost_usd"]) * NANO == figures["routed_nusd"]
    assert Decimal(report["cheapest_cost_usd"]) * NANO == figures["cheapest_nusd"]
    # Round-robin's exact walk is pinned by tests/test_reporting_unit.py (figures by hand);
    # here, what any assignment to eligible endpoints must satisfy, and that routing won.
    round_robin = Decimal(report["round_robin_cost_usd"]) * NANO
    assert figures["cheapest_nusd"] <= round_robin <= figures["dearest_nusd"]
    assert figures["cheapest_nusd"] <= figures["routed_nusd"] < round_robin


def test_embedded_demo_report_matches_its_database(tmp_path: Path) -> None:
    database = f"sqlite:///{tmp_path / 'demo.db'}"
    done = _demo(["--messages", "60", "--json"], _no_aimesh_env(AIMESH_DATABASE_URL=database),
                 tmp_path)
    report = json.loads(done.stdout.strip().splitlines()[-1])
    engine = create_engine(database)
    try:
        assert_report_matches(report, recompute(engine), sent=60)
    finally:
        engine.dispose()
    flaky = DEMO_ENDPOINTS[0][0]
    assert report["endpoints"][flaky]["answered"] > 0  # the cheap flaky one does get traffic


def test_embedded_demo_prints_the_report_and_exits_zero(tmp_path: Path) -> None:
    done = _demo(["--messages", "40"], _no_aimesh_env(), tmp_path)
    for expected in ("Per endpoint", "Per agent", "p50/p99 ms", "failed calls", "fallbacks",
                     "round-robin would have cost", "always-cheapest",
                     "answered without a call", "refused by a budget"):
        assert expected in done.stdout, expected
    answered = re.search(r"(\d+) answered, (\d+) failed", done.stdout)
    refused = re.search(r"refused by a budget: (\d+)", done.stdout)
    assert answered and refused and int(answered[1]) + int(refused[1]) == 40, done.stdout
    assert int(answered[2]) <= int(refused[1]), done.stdout  # failed: refused at a fallback
    assert any(endpoint_id in done.stdout for endpoint_id, *_ in DEMO_ENDPOINTS)
    assert not (tmp_path / "aimesh.db").exists()  # the demo used its own throw-away database


def _demo_worker_pids(broker: str) -> list[int]:
    """Processes still running a demo worker node (`-n aimesh-demo-...`) on `broker`."""
    found = []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            argv = (proc / "cmdline").read_bytes().split(b"\0")
            environ = (proc / "environ").read_bytes().split(b"\0")
        except OSError:  # gone meanwhile, or not ours to read
            continue
        if any(a.startswith(b"aimesh-demo-") for a in argv) and (
                f"AIMESH_BROKER_URL={broker}".encode() in environ):
            found.append(int(proc.name))
    return found


def test_demo_on_real_servers_with_its_own_workers(clean: None, tmp_path: Path) -> None:
    # The demo's broker is this slot's live-figures db (the demo's default: live figures on
    # the broker), not the session workers' broker: they follow every registered endpoint,
    # and would otherwise take some of the demo's messages without its endpoints' API key.
    broker = TEST_ENV["AIMESH_REDIS_URL"]
    env = _no_aimesh_env()
    done = _demo(["--broker", broker, "--db", DATABASE, "--messages", "60", "--json"], env,
                 tmp_path)
    report = json.loads(done.stdout.strip().splitlines()[-1])
    engine = create_engine(DATABASE.replace("postgresql://", "postgresql+psycopg://"))
    try:
        assert_report_matches(report, recompute(engine), sent=60)
    finally:
        engine.dispose()
    assert list_endpoints() == []  # the demo removed the endpoints whose simulators it stopped
    assert "starting a router worker and an endpoint worker" in done.stderr
    assert _demo_worker_pids(broker) == []  # and the worker processes it started are gone
