"""`aimesh budgets`: per-agent token and money budgets."""

from __future__ import annotations

import json
from datetime import datetime
from typing import TYPE_CHECKING

import typer

from aimesh_tasks.cli.shell import stdout, table

if TYPE_CHECKING:
    from aimesh_tasks.budgets import BudgetView

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
    period: str = typer.Option(None, "--period",
                               help="none, daily, monthly or rolling (new budgets: none)."),
    rolling_s: int = typer.Option(None, "--rolling-s", help="Length of a rolling period."),
    expires: str = typer.Option(None, "--expires", help="Expiry, ISO 8601 with zone."),
    clear_tokens: bool = typer.Option(False, "--clear-tokens", help="Remove the token limit."),
    clear_usd: bool = typer.Option(False, "--clear-usd", help="Remove the USD limit."),
    clear_expires: bool = typer.Option(False, "--clear-expires", help="Remove the expiry."),
) -> None:
    """Create a budget, or change only what is given (spent amounts are kept).

    `aimesh budgets set bot --usd 25` then `--tokens 2000000` keeps both limits;
    `--clear-usd` removes one.
    """
    from aimesh_tasks.budgets import set_budget

    clear = tuple(name for name, given in (("tokens", clear_tokens), ("usd", clear_usd),
                                           ("expires", clear_expires)) if given)
    view = set_budget(agent_id, tokens=tokens, usd=usd, period=period, rolling_s=rolling_s,
                      expires_at=_expiry(expires), clear=clear)
    typer.echo(f"budget of {view.agent_id}: {_limit(view.token_limit)} tokens, "
               f"${_limit(view.usd_limit)}, period {view.period}"
               + (f", expires {view.expires_at.isoformat()}" if view.expires_at else ""))


@cli.command("show")
def show(
    agent_id: str = typer.Argument(None, help="One agent; all budgets when left out."),
    as_json: bool = typer.Option(False, "--json", help="One JSON object per line."),
) -> None:
    """Limits, spent and reserved amounts, per agent."""
    from aimesh_tasks.budgets import get_budget, list_budgets

    views: list[BudgetView] = [get_budget(agent_id)] if agent_id else list_budgets()
    if as_json:
        for view in views:
            typer.echo(json.dumps(view.to_dict()))
        return
    if not views:
        typer.echo("no budgets set; set one with `aimesh budgets set AGENT --usd 25`")
        return
    # The agent id is never cut (two agents with one prefix must stay apart); limits share
    # a column with what is used, and expiry shows only when a budget has one, so the
    # table fits 80 columns.
    expiring = any(v.expires_at for v in views)
    rows = table("agent", "tokens used/limit", "USD used/limit", "held", "period",
                 *(["expires"] if expiring else []))
    for v in views:
        expires = [v.expires_at.strftime("%Y-%m-%d") if v.expires_at else "-"] if expiring \
            else []
        rows.add_row(v.agent_id, f"{v.spent_tokens}/{_limit(v.token_limit)}",
                     f"{v.spent_usd}/{_limit(v.usd_limit)}",
                     f"{v.reserved_tokens} tok, ${v.reserved_usd}", v.period, *expires)
    stdout().print(rows)
