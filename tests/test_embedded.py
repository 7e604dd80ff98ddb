"""Embedded mode: no environment, no servers; the same path in one process."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

SCRIPT = """
import json
import re
from aimesh_tasks import add_endpoint, submit
from aimesh_tasks.routing import decisions_for
from aimesh_tasks.simulator import SimulatorConfig, start_simulator

with start_simulator(SimulatorConfig(completion_tokens=5)) as sim:
    add_endpoint(id="dear", base_url=sim.url, model="m", input_usd_per_1k="0.01",
                 output_usd_per_1k="0.01")
    add_endpoint(id="cheap", base_url=sim.url, model="m", input_usd_per_1k="0.001",
                 output_usd_per_1k="0.001")
    results = [submit(agent_id="embedded-test", prompt=f"hello {n}").get(timeout=30)
               for n in range(5)]
    print(json.dumps({
        "endpoints": sorted({r["endpoint_id"] for r in results}),
        "output_tokens": [r["output_tokens"] for r in results],
        "calls": sim.stats()["calls"],
        "decisions": len(decisions_for(results[0]["message_id"])),
    }))
"""


def _clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items()
            if not k.startswith("AIMESH_") and k != "DEDUP_TTL_SECS"}


def test_embedded_mode_runs_the_whole_path_with_no_servers(tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, "-c", SCRIPT], cwd=tmp_path, env=_clean_env(),
                          capture_output=True, text=True, timeout=90)
    assert done.returncode == 0, done.stderr[-3000:]
    figures = json.loads(done.stdout.strip().splitlines()[-1])
    assert figures["endpoints"] == ["cheap"]
    assert figures["output_tokens"] == [5] * 5
    assert figures["calls"] == 5
    assert figures["decisions"] == 1
    assert (tmp_path / "aimesh.db").exists()  # the default SQLite file, in the working dir


def test_demo_runs_embedded_and_exits_zero(tmp_path: Path) -> None:
    aimesh = str(Path(sys.executable).with_name("aimesh"))
    done = subprocess.run([aimesh, "demo", "--messages", "40"], cwd=tmp_path,
                          env=_clean_env(), capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "budget-llm" in done.stdout and "round-robin" in done.stdout
    answered = re.search(r"(\d+) answered, 0 failed", done.stdout)
    refused = re.search(r"refused by a budget: (\d+)", done.stdout)
    assert answered and refused, done.stdout
    assert int(answered.group(1)) + int(refused.group(1)) == 40
