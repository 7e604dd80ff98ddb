"""`aimesh budgets`: per-agent token and money budgets."""

from __future__ import annotations

import json
from datetime import datetime

import typer
from rich.console import Console
from rich.table import Table

from aimesh_tasks.budgets import BudgetView, get_budget, list_budgets, set_budget

cli = typer.Typer(help="Per-agent budgets in tokens and USD.", no_args_is_help=True)


def _limit(value: object) -> str:
    return "-" if value is None else str(value)


def _expiry(value: str | None) -> datetime | None:
    if value is None:
        return None
    try:
        expires = datetime.fromisoformat(value)
    except ValueError:
        raise typer.BadParameter(f"'{value}' is not an ISO 8601 time",
                                 param_hint="--expires") from None
    if expires.tzinfo is None:
        raise typer.BadParameter("give a time zone, e.g. 2027-01-01T00:00:00Z",
                                 param_hint="--expires")
    return expires


@cli.command("set")
def set_(
    agent_id: str = typer.Argument(..., help="A registered agent (`aimesh agents add`)."),
    tokens: str = typer.Option(None, "--tokens", help="Token limit (input + output)."),
    usd: str = typer.Option(None, "--usd", help="USD limit, e.g. 12.50"),
    period: str = typer.Option("none", "--period", help="none, daily, monthly or rolling."),
    rolling_s: int = typer.Option(None, "--rolling-s", help="Length of a rolling period."),
    expires: str = typer.Option(None, "--expires", help="Expiry, ISO 8601 with zone."),
) -> None:
    """Create or change an agent's budget (spent amounts are kept)."""
    view = set_budget(agent_id, tokens=tokens, usd=usd, period=period, rolling_s=rolling_s,
                      expires_at=_expiry(expires))
    typer.echo(f"budget of {view.agent_id}: {_limit(view.token_limit)} tokens, "
               f"${_limit(view.usd_limit)}, period {view.period}")


@cli.command("show")
def show(
    agent_id: str = typer.Argument(None, help="One agent; all budgets when left out."),
    as_json: bool = typer.Option(False, "--json", help="One JSON object per line."),
) -> None:
    """Limits, spent and reserved amounts, per agent."""
    views: list[BudgetView] = [get_budget(agent_id)] if agent_id else list_budgets()
    if as_json:
        for view in views:
            typer.echo(json.dumps(view.to_dict()))
        return
    table = Table("agent", "token limit", "tokens spent", "tokens reserved", "USD limit",
                  "USD spent", "USD reserved", "period", "expires")
    for v in views:
        table.add_row(v.agent_id, _limit(v.token_limit), str(v.spent_tokens),
                      str(v.reserved_tokens), _limit(v.usd_limit), str(v.spent_usd),
                      str(v.reserved_usd), v.period,
                      v.expires_at.isoformat() if v.expires_at else "-")
    Console().print(table)
