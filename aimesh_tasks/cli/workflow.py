"""`aimesh workflow`: run a workflow file (optionally watching each step), show a run."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer

from aimesh_tasks.cli.shell import (
    EXIT_FAILED,
    check_servers,
    quiet_embedded_logs,
    short_publish_retries,
    stdout,
    table,
)

if TYPE_CHECKING:
    from rich.table import Table

cli = typer.Typer(help="Scatter-gather workflows: DAGs of agent steps.", no_args_is_help=True)
POLL_S = 0.25
STATUS_STYLE = {"pending": "dim", "running": "yellow", "done": "green", "failed": "red",
                "skipped": "magenta"}


def _steps_table(view: dict[str, Any]) -> Table:
    shown = table("step", "status", "endpoint", "cost USD", "tokens", "ms",
                  title=f"run {view['run_id']} ({view['name']}): {view['status']}")
    for s in view["steps"]:
        style = STATUS_STYLE.get(s["status"], "")
        took = "-" if s["duration_ms"] is None else f"{s['duration_ms']:.0f}"
        shown.add_row(s["step_id"], f"[{style}]{s['status']}[/]", s["endpoint_id"] or "-",
                      s["cost_usd"], str(s["tokens"]), took)
    return shown


def _finished(view: dict[str, Any]) -> bool:
    return view["result"] is not None


def _watch(run_id: str, timeout_s: float) -> dict[str, Any]:
    from rich.live import Live

    from aimesh_tasks.workflows import run_view

    deadline = time.monotonic() + timeout_s
    view = run_view(run_id)
    with Live(_steps_table(view), console=stdout(), refresh_per_second=8) as live:
        while not _finished(view) and time.monotonic() < deadline:
            time.sleep(POLL_S)
            view = run_view(run_id)
            live.update(_steps_table(view))
    return view


def _poll(run_id: str, timeout_s: float) -> dict[str, Any]:
    from aimesh_tasks.workflows import run_view

    deadline = time.monotonic() + timeout_s
    view = run_view(run_id)
    while not _finished(view) and time.monotonic() < deadline:
        time.sleep(POLL_S)
        view = run_view(run_id)
    return view


def print_answers(view: dict[str, Any]) -> None:
    """Each step's answer (or why it has none), in the order of the steps."""
    result = view["result"] or {}
    outputs, failures = result.get("outputs", {}), result.get("failures", {})
    skipped = result.get("skipped", {})
    for step in view["steps"]:
        step_id = step["step_id"]
        if step_id in outputs:
            typer.echo(f"--- {step_id}:")
            typer.echo(outputs[step_id])
        elif step_id in failures:
            reason = (failures[step_id] or {}).get("message") or failures[step_id]
            typer.echo(f"--- {step_id}: failed: {reason}")
        elif step_id in skipped:
            typer.echo(f"--- {step_id}: skipped: {skipped[step_id]}")
    if not _finished(view):
        typer.echo(f"run {view['run_id']} has not finished: `aimesh workflow status "
                   f"{view['run_id']}`", err=True)


def _exit_for(view: dict[str, Any]) -> None:
    if not _finished(view) or view["status"] != "done":
        raise typer.Exit(EXIT_FAILED)


@cli.command("run")
def run(
    file: str = typer.Argument(..., help="The workflow, as a .yaml/.yml or .json file."),
    wait: bool = typer.Option(False, "--wait", help="Watch every step until the run ends."),
    as_json: bool = typer.Option(False, "--json", help="Print the run as JSON, no table."),
    timeout_s: float = typer.Option(600, "--timeout-s", help="Longest wait with --wait."),
) -> None:
    """Validate and queue one run; with --wait, a live per-step view until it ends, then
    each step's answer (exit 1 if a step failed or was skipped).

    With --wait --json: the run as one JSON object, answers under result.outputs.
    """
    from aimesh_tasks.workflows import submit_workflow

    quiet_embedded_logs()
    check_servers()
    with short_publish_retries():
        run_id, _ = submit_workflow(Path(file))
    if not wait:
        typer.echo(json.dumps({"run_id": run_id}) if as_json else run_id)
        return
    if as_json:
        view = _poll(run_id, timeout_s)
        typer.echo(json.dumps(view))
    else:
        view = _watch(run_id, timeout_s)
        print_answers(view)
    _exit_for(view)


@cli.command("status")
def status(
    run_id: str = typer.Argument(..., help="A run id printed by `aimesh workflow run`."),
    as_json: bool = typer.Option(False, "--json", help="Print the run as JSON."),
) -> None:
    """The run's status and every step's state, endpoint, cost and time."""
    from aimesh_tasks.workflows import run_view

    view = run_view(run_id)
    if as_json:
        typer.echo(json.dumps(view))
    else:
        stdout().print(_steps_table(view))
