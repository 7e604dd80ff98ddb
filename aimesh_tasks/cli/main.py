"""`aimesh`: the entry point, command groups and the error-to-exit-code mapping.

Command modules are imported when their command runs, not to list them: `aimesh --help`
reads the one-line summaries below and imports no command module (and so no Celery,
SQLAlchemy or Redis client), which keeps it under half a second
(`benchmarks/bench_cli_start.py` measures it).
"""

from __future__ import annotations

import importlib
import sys
from typing import Any

import typer
from typer.core import TyperCommand

from aimesh_tasks.cli.shell import AimeshGroup

# name: (module, attribute: a Typer group or a command function, one-line summary)
COMMANDS: dict[str, tuple[str, str, str]] = {
    "demo": ("aimesh_tasks.cli.demo", "demo",
             "Three simulated endpoints, 200 messages, a cost report; no servers needed."),
    "enqueue": ("aimesh_tasks.cli.enqueue", "enqueue",
                "Queue messages for routing; print their ids, or with --wait their results."),
    "result": ("aimesh_tasks.cli.result", "result",
               "One message by id: answer, endpoint, cost, attempts and audit trail."),
    "report": ("aimesh_tasks.cli.report", "report",
               "Traffic, tokens, cost and latency per agent and endpoint, against other "
               "policies."),
    "endpoints": ("aimesh_tasks.cli.endpoints", "cli",
                  "Model endpoints: prices, capacity, keys, live figures."),
    "agents": ("aimesh_tasks.cli.agents", "cli", "Agents: who sends messages."),
    "routes": ("aimesh_tasks.cli.routes", "cli", "Routes: intents, targets, ACLs; rate limits."),
    "budgets": ("aimesh_tasks.cli.budgets", "cli", "Per-agent budgets in tokens and USD."),
    "workflow": ("aimesh_tasks.cli.workflow", "cli",
                 "Scatter-gather workflows: DAGs of agent steps."),
    "worker": ("aimesh_tasks.cli.worker", "worker",
               "Run a worker for the router queue and/or endpoint queues."),
    "cluster": ("aimesh_tasks.cli.cluster", "cli",
                "A local cluster of worker processes on real servers: up, status, down."),
    "db": ("aimesh_tasks.cli.db", "cli", "Database migrations: create and upgrade."),
    "dead": ("aimesh_tasks.cli.dead", "cli", "Dead-lettered task messages."),
    "simulate": ("aimesh_tasks.cli.simulate", "simulate",
                 "Run the simulated provider (OpenAI, Anthropic, Gemini, Cohere formats)."),
    "flower": ("aimesh_tasks.cli.flower", "flower",
               "Run Flower, the Celery web console, behind basic authentication."),
    "metrics": ("aimesh_tasks.cli.metrics", "metrics",
                "Serve cluster metrics (queue depths, live figures) for Prometheus."),
    "ingress": ("aimesh_tasks.cli.ingress", "ingress",
                "Serve the OpenAI-compatible HTTP ingress (uvicorn)."),
    "keys": ("aimesh_tasks.cli.keys", "cli", "API keys of the HTTP ingress (stored hashed)."),
}
# Commands that pass unknown options on (to `celery worker`).
PASS_THROUGH = {"worker": {"allow_extra_args": True, "ignore_unknown_options": True}}


def hide_flag_types(command: Any) -> None:
    """No `<bool>` after a flag in help (typer shows the type of every option): a flag
    takes no value, so there is no type to show."""
    help_option = command.get_help_option(command.context_class(command))
    for param in [*command.params, *([help_option] if help_option else [])]:
        if getattr(param, "is_flag", False):
            param.metavar = ""
    for sub in getattr(command, "commands", {}).values():
        hide_flag_types(sub)


def load_command(name: str) -> Any:
    """The click command for `aimesh NAME`, built from its module."""
    module, attribute, summary = COMMANDS[name]
    target = getattr(importlib.import_module(module), attribute)
    if isinstance(target, typer.Typer):
        command = typer.main.get_command(target)
    else:
        single = typer.Typer()
        single.command(name, context_settings=PASS_THROUGH.get(name))(target)
        command = typer.main.get_command(single)
    command.name = name
    command.short_help = summary
    hide_flag_types(command)
    return command


class AimeshCli(AimeshGroup):
    """The root group: commands are loaded on first use; help lists their summaries."""

    _listing = False

    def list_commands(self, ctx: Any) -> list[str]:
        """Every command, in the order of COMMANDS."""
        return list(COMMANDS)

    def get_command(self, ctx: Any, cmd_name: str) -> Any:
        """The command, loaded now; while help is listed, a summary stand-in."""
        if cmd_name in self.commands:
            return self.commands[cmd_name]
        if cmd_name not in COMMANDS:
            return None
        if self._listing:
            return TyperCommand(cmd_name, help=COMMANDS[cmd_name][2])
        command = load_command(cmd_name)
        self.add_command(command, cmd_name)
        return command

    def format_help(self, ctx: Any, formatter: Any) -> None:
        """The root help, without importing any command module."""
        self._listing = True
        try:
            hide_flag_types(self)
            super().format_help(ctx, formatter)
        finally:
            self._listing = False


cli = typer.Typer(
    name="aimesh",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    cls=AimeshCli,
    rich_markup_mode="markdown",
)


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
    --output-price 0.002`, then `aimesh enqueue "Hello" --wait`, then
    `aimesh result MESSAGE_ID` and `aimesh report`.

    With no AIMESH_* variables everything runs embedded in this process (SQLite file
    ./aimesh.db, in-memory broker). For a cluster, set AIMESH_BROKER_URL,
    AIMESH_RESULT_BACKEND, AIMESH_REDIS_URL and AIMESH_DATABASE_URL to Redis and
    Postgres, run `aimesh db upgrade`, then `aimesh cluster up` (or start
    `aimesh worker --router` and `aimesh worker --endpoints all` yourself).

    Exit codes: 0 done; 1 some messages were refused or failed; 2 bad input, an
    invalid setting, an unknown id or an unreachable server (one `error:` line on
    stderr).
    """


def _quiet_result_teardown(unraisable: Any) -> None:
    # A Celery AsyncResult still alive when Python shuts down unsubscribes from the Redis
    # result backend in its __del__ while imports already fail; Python would print that
    # as an ignored exception with a traceback after the command's own output.
    where = getattr(unraisable.object, "__qualname__", "")
    if sys.is_finalizing() and where == "AsyncResult.__del__":
        return
    sys.__unraisablehook__(unraisable)


def main() -> None:
    """Run the CLI (errors a user can fix become one line on stderr, see cli.shell)."""
    sys.unraisablehook = _quiet_result_teardown
    cli()
