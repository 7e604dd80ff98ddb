"""`aimesh dead`: the messages workers set aside, to inspect, requeue or purge."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import typer

from aimesh_tasks.cli.shell import fail, stdout, table
from aimesh_tasks.delivery import dead_letters as store

cli = typer.Typer(help="Dead letters: messages a worker could not run (bad envelope, unknown "
                       "task, bad arguments, a task that kept killing its worker).",
                  no_args_is_help=True)
QUEUE = typer.Option(None, "--queue", "-q", help="Only this queue (default: every queue).")


def _when(epoch_s: float) -> str:
    return datetime.fromtimestamp(epoch_s, UTC).isoformat(timespec="seconds")


@cli.command("list")
def list_(
    queue: str = QUEUE,
    limit: int = typer.Option(100, "--limit", min=1, help="Newest entries shown."),
    as_json: bool = typer.Option(False, "--json", help="One JSON object per line."),
) -> None:
    """The newest dead letters, newest first."""
    entries = store.list_entries(queue, limit)
    if as_json:
        for entry in entries:
            typer.echo(json.dumps(store.to_json_dict(entry, with_raw=False)))
        return
    if not entries:
        typer.echo("no dead letters")
        return
    rows = table("id", "queue", "reason", "task", "task id", "bytes", "at", "detail")
    for e in entries:
        rows.add_row(e["id"], e["queue"], e["reason"], e["task"] or "-", e["task_id"] or "-",
                     str(e["size"]), _when(e["at"]), e["detail"][:80])
    stdout().print(rows)


@cli.command("show")
def show(
    ref: str = typer.Argument(..., help="A dead-letter id, or the task id of one."),
    queue: str = QUEUE,
) -> None:
    """One dead letter as JSON, with its raw bytes (base64, and as text)."""
    typer.echo(json.dumps(store.to_json_dict(store.show(ref, queue)), indent=2))


@cli.command("requeue")
def requeue(
    ref: str = typer.Argument(..., help="A dead-letter id, or the task id of one."),
    queue: str = QUEUE,
) -> None:
    """Put a dead letter's bytes back on its queue (and remove it from the dead letters)."""
    entry = store.requeue(ref, queue)
    typer.echo(f"requeued dead letter {entry['id']} onto {entry['queue']}"
               + (f" (task {entry['task_id']})" if entry["task_id"] else ""))


@cli.command("purge")
def purge(
    ref: str = typer.Argument(None, help="One dead-letter id or task id (default: all)."),
    queue: str = QUEUE,
    yes: bool = typer.Option(False, "--yes", "-y", help="Do not ask before deleting all."),
) -> None:
    """Delete one dead letter, or every dead letter of a queue or of all queues."""
    if ref is None and not yes:
        where = f"queue {queue}" if queue else "every queue"
        if not typer.confirm(f"delete every dead letter of {where}?"):
            fail("nothing deleted")
    removed = store.purge(queue, ref)
    typer.echo(f"deleted {removed} dead letter{'s' if removed != 1 else ''}")
