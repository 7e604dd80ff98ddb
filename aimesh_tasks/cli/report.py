"""`aimesh report`: what the recorded traffic did and cost, and what it would have cost."""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import TYPE_CHECKING, Any

import typer

from aimesh_tasks.cli.shell import stdout, table, usd
from aimesh_tasks.errors import InvalidInput

if TYPE_CHECKING:
    from rich.console import Console
    from rich.table import Table

_RELATIVE = re.compile(r"^(\d+(?:\.\d+)?)([smhd])$")
_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_since(value: str, now: datetime | None = None) -> datetime:
    """'90s', '15m', '2h', '7d' (ago) or an ISO-8601 time (UTC if it has no zone)."""
    now = now or datetime.now(UTC)
    relative = _RELATIVE.match(value.strip())
    if relative:
        return now - timedelta(seconds=float(relative.group(1)) * _UNIT_S[relative.group(2)])
    try:
        moment = datetime.fromisoformat(value.strip())
    except ValueError:
        raise InvalidInput(
            f"--since: '{value}' is neither a duration ('90s', '15m', '2h', '7d') nor an "
            "ISO time ('2026-01-31T09:00:00Z')", field="since", errors=[]) from None
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def _latency(figures: dict[str, Any]) -> str:
    if figures["p50_ms"] is None:
        return "-"
    return f"{figures['p50_ms']:.0f}/{figures['p99_ms']:.0f}"


def endpoint_table(report: dict[str, Any], endpoints: list[str] | None = None) -> Table:
    """Per endpoint: answered and failed calls, tokens, cost, p50/p99; `endpoints` that
    took no traffic are listed too, with zeros."""
    rows = table("endpoint", "answered", "failed calls", "tokens in/out", "cost $",
                 "p50/p99 ms", title="Per endpoint")
    for endpoint_id, g in report["endpoints"].items():
        rows.add_row(endpoint_id, str(g["answered"]), str(g["failed_calls"]),
                     f"{g['input_tokens']}/{g['output_tokens']}", usd(g["cost_usd"]),
                     _latency(g))
    for endpoint_id in [e for e in endpoints or [] if e not in report["endpoints"]]:
        rows.add_row(endpoint_id, "0", "0", "0/0", usd("0"), "- (no traffic)")
    return rows


def agent_table(report: dict[str, Any]) -> Table:
    """Per agent (and the total): messages answered and failed, fallbacks, tokens, cost."""
    rows = table("agent", "answered", "failed", "fallbacks", "tokens", "cost $", "p50/p99 ms",
                 title="Per agent")
    for agent_id, g in [*report["agents"].items(), ("total", report["total"])]:
        rows.add_row(agent_id, str(g["answered"]), str(g["failed"]), str(g["fallbacks"]),
                     str(g["input_tokens"] + g["output_tokens"]), usd(g["cost_usd"]),
                     _latency(g))
    return rows


def _share(part: str, whole: str) -> str:
    return f"{Decimal(part) / Decimal(whole):.0%}" if Decimal(whole) else "-"


def policy_lines(report: dict[str, Any]) -> list[str]:
    """The routed cost against round-robin and always-cheapest, and the unroutable count."""
    routed, round_robin = report["routed_cost_usd"], report["round_robin_cost_usd"]
    lines = [
        f"cost as routed: ${routed}; round-robin would have cost ${round_robin} (routed = "
        f"{_share(routed, round_robin)} of it), always-cheapest ${report['cheapest_cost_usd']}",
    ]
    if report["total"]["unroutable"]:
        lines.append(f"{report['total']['unroutable']} messages found no endpoint (unroutable)")
    return lines


def print_report(report: dict[str, Any], console: Console,
                 endpoints: list[str] | None = None) -> None:
    """The report as tables and a cost summary (`endpoints`: list these even if idle)."""
    console.print(endpoint_table(report, endpoints))
    console.print(agent_table(report))
    for line in policy_lines(report):
        console.print(line, highlight=False)
    cache = report["cache"]
    console.print(
        f"answered without a call: {cache['answers']} (cache {cache['exact']}, semantic "
        f"{cache['semantic']}, joined an identical call {cache['single_flight']}), saving "
        f"${cache['saved_usd']}; refused by a budget: {report['budget_rejections']}",
        highlight=False)


def report(
    since: str = typer.Option(None, "--since", help="Only traffic since: '2h', '7d', or ISO."),
    agent: str = typer.Option(None, "--agent", "-a", help="Only this agent's traffic."),
    as_json: bool = typer.Option(False, "--json", help="The report as one JSON object."),
) -> None:
    """Per agent and per endpoint: messages, tokens, cost, failures, p50/p99 latency, and
    what the same traffic would have cost under round-robin and always-the-cheapest (priced
    as each routing decision saw its candidates)."""
    from aimesh_tasks.reporting import traffic_report

    figures = traffic_report(parse_since(since) if since else None, agent)
    if as_json:
        typer.echo(json.dumps(figures))
        return
    if not figures["endpoints"] and not figures["agents"]:
        typer.echo("no traffic recorded" + (f" for agent '{agent}'" if agent else "")
                   + (f" since {figures['since']}" if since else ""))
        return
    print_report(figures, stdout())
