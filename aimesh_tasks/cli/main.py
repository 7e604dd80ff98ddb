"""`aimesh`: the entry point, command groups and the error-to-exit-code mapping."""

from __future__ import annotations

import sys

import typer

from aimesh_tasks.cli import db, demo, endpoints, simulate, worker
from aimesh_tasks.errors import AimeshError

cli = typer.Typer(
    name="aimesh",
    help="aimesh-tasks: a task queue for AI agents' LLM calls, on Celery.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
cli.add_typer(db.cli, name="db")
cli.add_typer(endpoints.cli, name="endpoints")
cli.command(
    "worker", context_settings={"allow_extra_args": True, "ignore_unknown_options": True}
)(worker.worker)
cli.command("simulate")(simulate.simulate)
cli.command("demo")(demo.demo)


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
    """aimesh-tasks: route AI agents' messages to LLM endpoints through Celery."""


def main() -> None:
    """Run the CLI; an AimeshError becomes one line on stderr and exit code 2."""
    try:
        cli()
    except AimeshError as exc:
        typer.echo(f"error: {exc.message}", err=True)
        sys.exit(2)
