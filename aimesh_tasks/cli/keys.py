"""`aimesh keys`: API keys of the HTTP ingress (create shows the key once)."""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime, timedelta
from typing import Annotated

import typer

from aimesh_tasks.api_keys import create_key, list_keys, revoke_key
from aimesh_tasks.cli.shell import stdout, table

cli = typer.Typer(help="API keys of the HTTP ingress: stored only as hashes.",
                  no_args_is_help=True)
DURATION = re.compile(r"^(\d+)([smhd])$")
UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days"}


def parse_expiry(value: str | None, now: datetime | None = None) -> datetime | None:
    """'30d', '12h', '15m', '90s' from now, or an ISO 8601 time with a zone."""
    if value is None:
        return None
    now = now or datetime.now(UTC)
    if match := DURATION.match(value.strip()):
        return now + timedelta(**{UNITS[match.group(2)]: int(match.group(1))})
    try:
        expires = datetime.fromisoformat(value)
    except ValueError:
        raise typer.BadParameter(f"'{value}' is neither a duration (30d, 12h, 15m) nor an "
                                 "ISO 8601 time", param_hint="--expires") from None
    if expires.tzinfo is None:
        raise typer.BadParameter("give a time zone, e.g. 2027-01-01T00:00:00Z",
                                 param_hint="--expires")
    return expires


@cli.command("create")
def create(
    agent: str = typer.Option(..., "--agent", help="The agent the key identifies."),
    acts_for: Annotated[list[str] | None, typer.Option(
        "--acts-for", help="Another agent it may act for (X-Source-Agent); repeat for more.",
    )] = None,
    expires: str = typer.Option(None, "--expires", help="30d, 12h, or an ISO 8601 time."),
    admin: bool = typer.Option(False, "--admin", help="May use the admin routes."),
    note: str = typer.Option("", "--note", help="What the key is for."),
    respond_async: bool = typer.Option(False, "--respond-async",
                                       help="Answer its chat requests 202 + Location."),
    as_json: bool = typer.Option(False, "--json", help="Print the key and its record as JSON."),
) -> None:
    """Create a key; it is printed once and stored only as a hash."""
    created = create_key(agent, acts_for=acts_for or (), admin=admin,
                         expires_at=parse_expiry(expires), note=note,
                         respond_async=respond_async)
    if as_json:
        typer.echo(json.dumps({"key": created.key, **created.info.to_dict()}))
        return
    typer.echo(created.key)
    typer.echo(f"(key {created.info.prefix} for agent {agent}: shown once, keep it now)",
               err=True)


@cli.command("revoke")
def revoke(prefix: str = typer.Argument(..., help="The key's prefix (amk_...) or the key.")
           ) -> None:
    """Revoke a key; every ingress process refuses it within a second."""
    info = revoke_key(prefix)
    typer.echo(f"revoked {info.prefix} (agent {info.agent_id})")


@cli.command("list")
def list_(agent: str = typer.Option(None, "--agent", help="Only this agent's keys."),
          as_json: bool = typer.Option(False, "--json", help="One JSON object per line.")
          ) -> None:
    """Every key's prefix, agent and state (never the key)."""
    keys = list_keys(agent)
    if as_json:
        for info in keys:
            typer.echo(json.dumps(info.to_dict()))
        return
    now = datetime.now(UTC)
    rows = table("prefix", "agent", "acts for", "admin", "state", "expires")
    for info in keys:
        state = ("revoked" if info.revoked_at else "active" if info.usable(now) else "expired")
        expiry = info.expires_at.strftime("%Y-%m-%d %H:%M") if info.expires_at else "-"
        rows.add_row(info.prefix, info.agent_id, ",".join(info.acts_for) or "-",
                     "yes" if info.admin else "no", state, expiry)
    stdout().print(rows)
