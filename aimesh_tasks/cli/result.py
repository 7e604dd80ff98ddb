"""`aimesh result ID`: one message by id: its answer, cost, attempts and audit trail.

The answer (text, endpoint, model, cost, charged amount) comes from the Celery result
backend while it keeps the result; attempts, routing decisions, charges and the audit
trail come from the database, which keeps them.
"""

from __future__ import annotations

import json
import time
from typing import Any

import typer

from aimesh_tasks.cli.shell import EXIT_FAILED, stdout, table, usd

POLL_S = 0.2


def backend_state(message_id: str) -> tuple[str, Any]:
    """(Celery state, result or error text) of a message in the result backend."""
    from celery.result import AsyncResult

    from aimesh_tasks.app import app

    pending = AsyncResult(message_id, app=app)
    state = str(pending.state)
    if state == "SUCCESS":
        return state, pending.result
    if state == "FAILURE":
        error = pending.result
        return state, str(getattr(error, "message", None) or error)
    return state, None


def _wait(message_id: str, timeout_s: float) -> tuple[str, Any]:
    deadline = time.monotonic() + timeout_s
    state, value = backend_state(message_id)
    while state not in ("SUCCESS", "FAILURE") and time.monotonic() < deadline:
        time.sleep(POLL_S)
        state, value = backend_state(message_id)
    return state, value


def _answer_lines(state: str, value: Any) -> list[str]:
    if state == "SUCCESS" and isinstance(value, dict):
        lines = [f"endpoint {value['endpoint_id']} (model {value['model']}), tokens "
                 f"{value['input_tokens']} in / {value['output_tokens']} out, cost "
                 f"${value['cost_usd']}, charged ${value.get('charged_usd', '0')}"
                 + (", from the cache" if value.get("cached") else "")
                 + (", joined an identical call" if value.get("dedup") else ""),
                 "answer:", *(f"  {line}" for line in str(value["text"]).splitlines() or [""])]
        return lines
    if state == "FAILURE":
        return [f"failed: {value}"]
    return [f"no result in the result backend (state {state}): still queued or running, "
            "or its result expired (the records below stay)"]


def _print(view: dict[str, Any]) -> None:
    record, console = view["record"], stdout()
    console.print(f"message {view['message_id']} from {record['agent_id']}: {view['state']}; "
                  f"charged ${record['charged_usd']}", highlight=False)
    for line in _answer_lines(view["state"], view["result"]):
        console.print(line, highlight=False, markup=False)
    attempts = table("endpoint", "ok", "status", "ms", "tokens in/out", "cost $", "error",
                     title="Attempts")
    for a in record["attempts"]:
        attempts.add_row(a["endpoint_id"], "yes" if a["ok"] else "no", str(a["status"] or "-"),
                         f"{a['latency_ms']:.0f}", f"{a['input_tokens']}/{a['output_tokens']}",
                         usd(a["cost_usd"]), a["error"] or "")
    trail = table("time", "event", "endpoint", "reason", title="Audit trail")
    for a in record["audit"]:
        trail.add_row((a["at"] or "-")[11:23], a["event"], a["endpoint_id"] or "-",
                      a["reason"] or "")
    console.print(attempts)
    console.print(trail)


def result(
    message_id: str = typer.Argument(..., help="A message id (`aimesh enqueue` prints them)."),
    wait: bool = typer.Option(False, "--wait", "-w", help="Wait for the answer first."),
    timeout_s: float = typer.Option(60.0, "--timeout", help="With --wait: seconds."),
    as_json: bool = typer.Option(False, "--json", help="Print everything as one JSON object."),
) -> None:
    """One message by id: answer text, endpoint, tokens, cost and what was charged, every
    call attempt and the audit trail (exit 1 if it failed).

    Example: `aimesh result 0b7c...e1 --json`.
    """
    from aimesh_tasks.reporting import message_record

    state, value = _wait(message_id, timeout_s) if wait else backend_state(message_id)
    view = {"message_id": message_id, "state": state, "result": value,
            "record": message_record(message_id)}
    if as_json:
        typer.echo(json.dumps(view, default=str))
    else:
        _print(view)
    if state == "FAILURE":
        raise typer.Exit(EXIT_FAILED)
