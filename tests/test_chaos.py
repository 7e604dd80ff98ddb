"""The fault matrix in the suite: small versions of the rows of benchmarks/chaos.py.

The rows run through the chaos script itself, in one subprocess for the whole module
(one Redis and one Postgres of its own, started and killed by PID on ports of this
slot's range, fresh workers per row), at 30 messages and outages scaled to 0.3 of the
full size. Each test then reads its row's report: every one of the five invariants held,
the fault really happened (kills counted, submits refused), and the charges are flagged
the way the fault makes them. Rows covered elsewhere are left to those files: whole
-worker kills, broker restarts and Postgres outages (test_durability.py), poison
(test_dead_letters.py), duplicates (test_delivery_once.py).

The invariant checks themselves are pure (`benchmarks.chaos.invariants.judge`): the
first tests show, on made-up facts, that each one tells a broken run from a sound one.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from benchmarks.chaos.invariants import Charge, Facts, ProviderCall, judge

ROOT = Path(__file__).resolve().parents[1]
SLOT = int(os.environ.get("AIMESH_TEST_SLOT", "0"))
# This slot's share of the chaos port ranges (Redis 16400-16499, Postgres 15440-15449).
REDIS_PORT, POSTGRES_PORT = 16450 + SLOT, 15444 + SLOT % 6
MESSAGES, FAULT_SCALE = 30, 0.3
RUN_BOUND_S = 1500

PRICES = {"ep": (1_000_000, 2_000_000)}  # nano-USD per 1k tokens: in, out


# --- the checks tell right from wrong (pure) -----------------------------------------------


def _call(key: str, prompt: int = 10, completion: int = 5) -> ProviderCall:
    return ProviderCall("ep", key, 200, prompt, completion)


def _charge(key: str, kind: str = "call", nusd: int = 20_000) -> Charge:
    return Charge(key, key.split(":")[0], "agent", "ep", 15, nusd, kind)


def _facts(calls: list[ProviderCall], charges: list[Charge], **changes: Any) -> Facts:
    facts = Facts(outcomes={"m1": "SUCCESS"}, calls=calls, prices=PRICES, charges=charges,
                  counters_off=[], open_reservations=0,
                  audits={"m1": Counter({"completed": 1})})
    for name, value in changes.items():
        setattr(facts, name, value)
    return facts


def test_a_sound_run_holds_every_invariant_with_spend_exact() -> None:
    verdict = judge(_facts([_call("m1:0")], [_charge("m1:0")]))
    assert all(verdict.holds().values()) and verdict.spend() == "exact"


@pytest.mark.parametrize(("facts", "broken"), [
    (_facts([_call("m1:0")], [_charge("m1:0")], outcomes={"m1": None}), "nothing lost"),
    (_facts([_call("m1:0")], [_charge("m1:0"), _charge("m1:0:redo-1")]),
     "one settlement and audit per outcome"),
    (_facts([_call("m1:0")], [_charge("m1:0")],
            audits={"m1": Counter({"completed": 1, "failed": 1})}),
     "one settlement and audit per outcome"),
    (_facts([_call("m1:0")], [_charge("m1:0")], audits={}),
     "one settlement and audit per outcome"),
    (_facts([_call("m1:0")], []), "spend exact or flagged"),
    (_facts([_call("m1:0")], [_charge("m1:0", nusd=19_999)]), "spend exact or flagged"),
    (_facts([_call("m1:0")], [_charge("m1:0")], counters_off=["agent"]),
     "spend exact or flagged"),
    (_facts([_call("m1:0")], [_charge("m1:0")], open_reservations=1), "no reservation left"),
    (_facts([_call("m1:0"), _call("m1:0")], [_charge("m1:0")]), "deliveries deduplicated"),
    (_facts([_call("m1:0"), _call("m1:0:redo-1")], [_charge("m1:0"), _charge("m1:0:redo-1")]),
     "deliveries deduplicated"),
])
def test_each_check_names_what_a_broken_run_broke(facts: Facts, broken: str) -> None:
    holds = judge(facts).holds()
    assert [name for name, held in holds.items() if not held] == [broken]


def test_a_call_killed_mid_flight_is_a_flagged_lost_charge_not_a_double_one() -> None:
    # The first delivery died with the answer in flight: charged `lost` at its reservation;
    # the delivery that took over called again under a redo key and paid the actual cost.
    verdict = judge(_facts([_call("m1:0"), _call("m1:0:redo-1")],
                           [_charge("m1:0", "lost", 74_000), _charge("m1:0:redo-1")]))
    assert all(verdict.holds().values())
    assert verdict.spend() == "flagged: 1 lost"


def test_a_call_the_reaper_charged_at_its_estimate_explains_a_repeat() -> None:
    verdict = judge(_facts([_call("m1:0"), _call("m1:0:redo-1")],
                           [_charge("m1:0", "reaped", 74_000), _charge("m1:0:redo-1")]))
    assert all(verdict.holds().values())
    assert verdict.flagged == Counter({"reaped at estimate": 1})


def test_a_lost_charge_for_a_call_never_made_is_flagged_as_such() -> None:
    verdict = judge(_facts([_call("m1:0:redo-1")],
                           [_charge("m1:0", "lost", 74_000), _charge("m1:0:redo-1")]))
    assert all(verdict.holds().values())
    assert verdict.flagged == Counter({"lost (never called)": 1})


def test_workflow_runs_are_not_held_to_a_message_audit_row() -> None:
    facts = _facts([_call("r1.h0:0")], [_charge("r1.h0:0")], outcomes={"r1": "SUCCESS"},
                   audits={})
    assert all(judge(facts, audited=False).holds().values())
    assert not judge(facts).holds()["one settlement and audit per outcome"]


# --- the rows, against servers of their own ------------------------------------------------

# row -> what its report must show besides "every invariant held"
ROWS: dict[str, dict[str, Any]] = {
    "kill-route": {"kills": 2, "spend": "exact"},
    "kill-before-call": {"kills": 2, "flagged": {"lost (never called)": 2}},
    "kill-during-call": {"kills": 2, "flagged": {"lost": 2}},
    "kill-before-settle": {"kills": 2, "spend": "exact"},
    "sigterm": {"spend": "exact", "note": "endpoint worker exited 0 after SIGTERM"},
    "redis-pause": {},
    "redis-full": {"refused": True},
    "provider-malformed": {"flagged_kind": "estimated"},
    "provider-no-usage": {"flagged_kind": "estimated"},
    "provider-hang": {},
    "chord-kill": {"kills": 2},
    "chord-redis-restart": {},
}


@pytest.fixture(scope="module")
def reports(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
            ) -> dict[str, dict[str, Any]]:
    """Run the selected rows in one chaos-script subprocess; their reports by name."""
    selected = [item.callspec.params["row"] for item in request.session.items
                if getattr(item, "module", None) is request.module and hasattr(item, "callspec")
                and "row" in item.callspec.params]
    out = tmp_path_factory.mktemp("chaos") / "reports.json"
    command = [sys.executable, str(ROOT / "benchmarks" / "chaos.py"),
               "--rows", ",".join(dict.fromkeys(selected)), "--messages", str(MESSAGES),
               "--fault-scale", str(FAULT_SCALE), "--redis-port", str(REDIS_PORT),
               "--postgres-port", str(POSTGRES_PORT), "--json", str(out)]
    done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT,
                          timeout=RUN_BOUND_S)
    if not out.exists():
        pytest.fail(f"the chaos script wrote no report (exit {done.returncode}):\n"
                    f"{done.stderr[-4000:]}")
    return {r["row"]: r for r in json.loads(out.read_text())}


@pytest.mark.chaos
@pytest.mark.slow
@pytest.mark.parametrize("row", list(ROWS))
def test_row(reports: dict[str, dict[str, Any]], row: str) -> None:
    report = reports[row]
    shown = json.dumps(report, indent=1)
    assert report["ok"], f"row {row} broke: {report['broken']}\n{shown}"
    assert report["messages"] >= 2 and report["lost"] == 0
    expected = ROWS[row]
    if "kills" in expected:
        assert report["kills"] == expected["kills"], shown
    if "spend" in expected:
        assert report["spend"] == expected["spend"], shown
    if "flagged" in expected:
        assert report["flagged"] == expected["flagged"], shown
    if "flagged_kind" in expected:
        assert report["flagged"].get(expected["flagged_kind"], 0) >= 1, shown
    if expected.get("refused"):
        assert sum(report["refused"].values()) >= 1, shown
    if "note" in expected:
        assert expected["note"] in report["notes"], shown
