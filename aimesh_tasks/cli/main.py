"""`aimesh`: the entry point, command groups and the error-to-exit-code mapping."""

from __future__ import annotations

import typer

from aimesh_tasks.cli import agents, budgets, db, demo, endpoints, enqueue, report, simulate, worker
from aimesh_tasks.cli import dead as dead_cli
from aimesh_tasks.cli import workflow as workflow_cli
from aimesh_tasks.cli.flower import flower as flower_command
from aimesh_tasks.cli.metrics import metrics as metrics_command
from aimesh_tasks.cli.shell import AimeshGroup

cli = typer.Typer(
    name="aimesh",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    cls=AimeshGroup,
    rich_markup_mode="markdown",
)
cli.add_typer(db.cli, name="db")
cli.add_typer(endpoints.cli, name="endpoints")
cli.add_typer(agents.cli, name="agents")
cli.add_typer(budgets.cli, name="budgets")
cli.add_typer(workflow_cli.cli, name="workflow")
cli.add_typer(dead_cli.cli, name="dead")
cli.command("enqueue")(enqueue.enqueue)
cli.command("report")(report.report)
cli.command(
    "worker", context_settings={"allow_extra_args": True, "ignore_unknown_options": True}
)(worker.worker)
cli.command("simulate")(simulate.simulate)
cli.command("demo")(demo.demo)
cli.command("flower")(flower_command)
cli.command("metrics")(metrics_command)


def _version(value: bool) -> None:
    if value:
        from aimesh_tasks import __version__

        typer.echo(f"aimesh-tasks {__version__}")
        raise typer.Exit()


@cli.callback()
def _root(
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Print the version and exit."
    ),
) -> None:
    """Route AI agents' LLM calls to the best endpoint through Celery queues.

    **Try it, no servers needed:** `aimesh demo` (three simulated endpoints, 200
    messages, a cost report).

    **Your own messages:** `aimesh simulate --port 8000 &`, then
    `aimesh endpoints add sim --url http://127.0.0.1:8000 --model sim --input-price 0.001
    --output-price 0.002`, then `aimesh enqueue "Hello" --wait`, then `aimesh report`.

    With no AIMESH_* variables everything runs embedded in this process (SQLite file
    ./aimesh.db, in-memory broker). For a cluster, set AIMESH_BROKER_URL,
    AIMESH_RESULT_BACKEND, AIMESH_REDIS_URL and AIMESH_DATABASE_URL to Redis and
    Postgres, run `aimesh db upgrade`, and start `aimesh worker --router` and
    `aimesh worker --endpoints all`.

    Exit codes: 0 done; 1 some messages were refused or failed; 2 bad input, an
    unknown id or an unreachable server (one `error:` line on stderr).
    """


def main() -> None:
    """Run the CLI (errors a user can fix become one line on stderr, see cli.shell)."""
    cli()
