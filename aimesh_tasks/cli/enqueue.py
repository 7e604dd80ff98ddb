"""`aimesh enqueue`: queue messages from arguments, a file, stdin or JSONL; maybe wait."""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import typer
from celery.exceptions import TimeoutError as CeleryTimeout
from celery.result import AsyncResult
from rich.progress import Progress
from rich.table import Table
from rich.text import Text

from aimesh_tasks.cli.shell import (
    EXIT_FAILED,
    check_servers,
    quiet_embedded_logs,
    short_publish_retries,
    stderr,
    stdout,
    table,
)
from aimesh_tasks.errors import AimeshError, InvalidInput, InvalidMessage
from aimesh_tasks.producer import submit
from aimesh_tasks.settings import get_settings

DEFAULT_AGENT = "cli"


@dataclass
class Outcome:
    """One input (a prompt or a JSONL line) and what became of it."""

    source: str
    pending: AsyncResult | None = None
    result: dict[str, Any] | None = None
    error: str | None = None

    @property
    def message_id(self) -> str | None:
        """The queued message's id (None if it was never queued)."""
        return None if self.pending is None else str(self.pending.id)

    def to_json(self) -> dict[str, Any]:
        """One JSON line: the result, or the error, or the queued id."""
        if self.result is not None:
            return self.result
        if self.error is not None:
            return {"source": self.source, "message_id": self.message_id, "error": self.error}
        return {"source": self.source, "message_id": self.message_id, "status": "queued"}


def read_input(path: str, option: str) -> str:
    """The text of `path` ('-' = stdin); InvalidInput naming the option if unreadable."""
    if path == "-":
        return sys.stdin.read()
    try:
        return Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise InvalidInput(f"{option}: cannot read '{path}': {exc.strerror or exc}",
                           field=option.lstrip("-"), errors=[]) from None
    except UnicodeDecodeError as exc:
        raise InvalidInput(f"{option}: '{path}' is not UTF-8 text ({exc.reason})",
                           field=option.lstrip("-"), errors=[]) from None


def parse_jsonl(text: str, defaults: dict[str, Any]
                ) -> tuple[list[tuple[str, dict[str, Any]]], list[Outcome]]:
    """(line label, message dict) per good line; an Outcome with the reason per bad one.

    Fields given on a line win over `defaults` (the --agent/--max-tokens/--model options).
    """
    messages: list[tuple[str, dict[str, Any]]] = []
    bad: list[Outcome] = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        label = f"line {number}"
        try:
            data = json.loads(line)
        except json.JSONDecodeError as exc:
            bad.append(Outcome(label, error=f"not JSON: {exc.msg} at column {exc.colno}"))
            continue
        if not isinstance(data, dict):
            bad.append(Outcome(label, error=f"message: expected a JSON object, got "
                                            f"{type(data).__name__}"))
            continue
        messages.append((label, {**defaults, **data}))
    return messages, bad


def prompt_messages(prompts: Iterable[str], defaults: dict[str, Any]
                    ) -> list[tuple[str, dict[str, Any]]]:
    """One message per non-empty prompt, with the option defaults."""
    chosen = [p.strip() for p in prompts if p.strip()]
    if len(chosen) == 1:
        return [("prompt", {**defaults, "prompt": chosen[0]})]
    return [(f"prompt {n}", {**defaults, "prompt": p}) for n, p in enumerate(chosen, start=1)]


def submit_all(items: list[tuple[str, dict[str, Any]]]) -> list[Outcome]:
    """Submit each message; an invalid one is an Outcome with its reason, the rest go in."""
    outcomes = []
    with _progress(len(items), "queueing") as advance:
        for label, data in items:
            try:
                outcomes.append(Outcome(label, pending=submit(data)))
            except InvalidMessage as exc:
                outcomes.append(Outcome(label, error=exc.message))
            advance()
    return outcomes


def wait_all(outcomes: list[Outcome], timeout_s: float) -> None:
    """Wait for every queued message's result, all within `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    queued = [o for o in outcomes if o.pending is not None]
    with _progress(len(queued), "answering") as advance:
        for outcome in queued:
            assert outcome.pending is not None
            try:
                remaining = max(deadline - time.monotonic(), 0.1)
                outcome.result = outcome.pending.get(timeout=remaining)
            except AimeshError as exc:
                outcome.error = exc.message
            except CeleryTimeout:
                outcome.error = (f"no result within {timeout_s:g}s (--timeout); is a worker "
                                 "running? `aimesh worker --router` and `--endpoints all`")
            advance()


@contextmanager
def _progress(total: int, label: str) -> Iterator[Callable[[], None]]:
    """A progress bar on stderr for batches; `advance()` moves it (nothing for one message)."""
    if total <= 1:
        yield lambda: None
        return
    with Progress(console=stderr(), transient=True) as bar:
        task = bar.add_task(label, total=total)
        yield lambda: bar.advance(task)


def _latency_ms(result: dict[str, Any]) -> str:
    return f"{float(result['queue_wait_ms']) + float(result['processing_ms']):.0f}"


def results_table(outcomes: list[Outcome]) -> Table:
    """Endpoint, tokens, cost, cached flag and latency per message (or its error)."""
    rows = table("source", "message", "endpoint", "tokens in/out", "cost $", "cached",
                 "latency ms", title="Results")
    for o in outcomes:
        message = (o.message_id or "-")[:12]
        if o.result is None:
            rows.add_row(o.source, message, Text(f"failed: {o.error}", style="red"), "", "", "",
                         "")
            continue
        r = o.result
        rows.add_row(o.source, message, r["endpoint_id"],
                     f"{r['input_tokens']}/{r['output_tokens']}", r["cost_usd"],
                     "yes" if r["cached"] else "no", _latency_ms(r))
    return rows


def _defaults(agent: str | None, max_tokens: int | None, model: str | None,
              plain: bool) -> dict[str, Any]:
    values = {"agent_id": agent or (DEFAULT_AGENT if plain else None),
              "max_tokens": max_tokens, "model": model}
    return {k: v for k, v in values.items() if v is not None}


def _stdin_is_terminal() -> bool:
    return sys.stdin.isatty()


def gather(prompt: list[str], file: str | None, jsonl: str | None, lines: bool,
           defaults: dict[str, Any]) -> tuple[list[tuple[str, dict[str, Any]]], list[Outcome]]:
    """The messages to submit and the inputs refused while parsing, from one source."""
    given = [name for name, value in (("PROMPT", prompt), ("--file", file), ("--jsonl", jsonl))
             if value]
    if len(given) > 1:
        raise InvalidInput(f"give one input, not {' and '.join(given)}", field="input",
                           errors=[])
    if jsonl:
        return parse_jsonl(read_input(jsonl, "--jsonl"), defaults)
    if prompt:
        return prompt_messages([" ".join(prompt)], defaults), []
    if file is None:
        if _stdin_is_terminal():
            raise InvalidInput("nothing to send: give a prompt, --file PATH, --jsonl PATH, "
                               "or pipe text on stdin (see `aimesh enqueue --help`)",
                               field="input", errors=[])
        file = "-"
    text = read_input(file, "--file")
    return prompt_messages(text.splitlines() if lines else [text], defaults), []


def _report(outcomes: list[Outcome], waited: bool, as_json: bool) -> None:
    if as_json:
        for o in outcomes:
            typer.echo(json.dumps(o.to_json()))
    elif waited:
        stdout().print(results_table(outcomes))
        if len(outcomes) == 1 and outcomes[0].result is not None:
            typer.echo(outcomes[0].result["text"])
        if len(outcomes) == 1 and outcomes[0].message_id is not None:
            typer.echo(f"details: aimesh result {outcomes[0].message_id}", err=True)
        elif outcomes:
            typer.echo("full message ids: --json; one in detail: aimesh result ID", err=True)
    else:
        for o in outcomes:
            if o.message_id is not None:
                typer.echo(o.message_id)
    if not as_json and not waited:
        for o in outcomes:
            if o.error is not None:
                typer.echo(f"{o.source}: {o.error}", err=True)
    failed = sum(1 for o in outcomes if o.error is not None)
    verb = "answered" if waited else "queued"
    typer.echo(f"{len(outcomes) - failed} {verb}, {failed} failed", err=True)


def enqueue(
    prompt: Annotated[list[str] | None,
                      typer.Argument(help="The prompt (several words are joined).")] = None,
    file: str = typer.Option(None, "--file", "-f",
                             help="Read the prompt from this file ('-' = stdin)."),
    jsonl: str = typer.Option(
        None, "--jsonl", help="One message per line as a JSON object with any AiMessage field "
        "(agent_id, prompt or messages, max_tokens, model, ...); '-' = stdin."),
    lines: bool = typer.Option(False, "--lines",
                               help="With --file or stdin: every line is its own prompt."),
    agent: str = typer.Option(None, "--agent", "-a",
                              help=f"Sending agent id (default '{DEFAULT_AGENT}'; for "
                                   "--jsonl only fills lines without agent_id)."),
    max_tokens: int = typer.Option(None, "--max-tokens", help="Most output tokens."),
    model: str = typer.Option(None, "--model", help="Only endpoints serving this model."),
    wait: bool = typer.Option(False, "--wait", "-w", help="Wait and print the results."),
    as_json: bool = typer.Option(False, "--json", help="JSON lines instead of a table."),
    timeout_s: float = typer.Option(120.0, "--timeout", help="With --wait: seconds, in all."),
) -> None:
    """Queue messages for routing; print their ids, or with --wait their results.

    Examples: `aimesh enqueue "Summarise the report" --agent research-bot --wait`;
    `aimesh enqueue --jsonl batch.jsonl --wait --json`; `cat prompts.txt | aimesh enqueue
    --lines`. A bad JSONL line is reported with its number and reason; the others still go
    in. Exit code 1 when any message was refused or failed.
    """
    items, outcomes = gather(prompt or [], file, jsonl, lines,
                             _defaults(agent, max_tokens, model, plain=jsonl is None))
    if not items and not outcomes:
        raise InvalidInput("nothing to send: the input holds no prompt or message",
                           field="input", errors=[])
    if get_settings().embedded:
        quiet_embedded_logs()
        if not wait:  # the in-process worker stops with this command: queued would be lost
            stderr().print("embedded mode (no AIMESH_BROKER_URL): waiting for the results")
            wait = True
    if items:
        check_servers()
        with short_publish_retries():
            outcomes = _in_input_order(outcomes + submit_all(items))
        if wait:
            wait_all(outcomes, timeout_s)
    _report(outcomes, wait, as_json)
    if any(o.error is not None for o in outcomes):
        raise typer.Exit(EXIT_FAILED)


def _in_input_order(outcomes: list[Outcome]) -> list[Outcome]:
    def key(o: Outcome) -> int:
        number = o.source.rsplit(" ", 1)[-1]
        return int(number) if number.isdigit() else 0

    return sorted(outcomes, key=key)
