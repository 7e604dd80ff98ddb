"""Start-up time of the `aimesh` command, against a bare interpreter in the same run.

    python benchmarks/bench_cli_start.py [--repeats 15]

Runs, as fresh processes, `python -c pass` (the floor), `aimesh --help`, `aimesh
--version` and `aimesh endpoints --help` (which loads one command module), and, for
reference, `python -c "import aimesh_tasks.cli.<every command module>"` (what every
start cost when the root imported all commands). Wall time per run, median and p90 over
the repeats. The goal for `aimesh --help` is 0.5 s; no test asserts it (timings never go
into pass/fail tests). Needs no server: every AIMESH_* variable is unset. JSON last.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

AIMESH = str(Path(sys.executable).with_name("aimesh"))
GOAL_S = 0.5


def _every_command_module() -> str:
    from aimesh_tasks.cli.main import COMMANDS

    modules = sorted({module for module, _, _ in COMMANDS.values()})
    return "; ".join(f"import {m}" for m in modules)


def _clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("AIMESH_")}


def _time(argv: list[str], repeats: int) -> dict[str, float]:
    env = _clean_env()
    samples = []
    for _ in range(repeats):
        started = time.perf_counter()
        subprocess.run(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                       check=True)
        samples.append(time.perf_counter() - started)
    samples.sort()
    return {"median_s": round(statistics.median(samples), 4),
            "p90_s": round(samples[min(len(samples) - 1, int(0.9 * len(samples)))], 4)}


def main() -> None:
    """Time each start-up and print the figures as one JSON line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args()
    cases = {
        "python_pass": [sys.executable, "-c", "pass"],
        "aimesh_help": [AIMESH, "--help"],
        "aimesh_version": [AIMESH, "--version"],
        "aimesh_endpoints_help": [AIMESH, "endpoints", "--help"],
        "import_every_command": [sys.executable, "-c", _every_command_module()],
    }
    _time(cases["aimesh_help"], 2)  # warm the file cache and .pyc files
    figures = {name: _time(argv, args.repeats) for name, argv in cases.items()}
    help_s = figures["aimesh_help"]["median_s"]
    summary = {
        **figures,
        "help_over_bare_python_s": round(help_s - figures["python_pass"]["median_s"], 4),
        "help_within_goal": help_s <= GOAL_S,
        "goal_s": GOAL_S,
        "repeats": args.repeats,
    }
    for name, figure in figures.items():
        print(f"{name:24} median {figure['median_s']:.3f} s  p90 {figure['p90_s']:.3f} s",
              file=sys.stderr)
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
