"""`aimesh keys`: API keys of the HTTP ingress (create shows the key once), and each
key's own rate limits (applied beside its agent's)."""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime, timedelta
from typing import Annotated

import typer

from aimesh_tasks.api_keys import KeyInfo, create_key, list_keys, revoke_key, set_key_limits
from aimesh_tasks.cli.shell import stdout, table
from aimesh_tasks.governance.limits import ON_EXCESS, RateLimit

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


RPS = typer.Option(None, "--rps", min=1, help="Requests per second (moving window).")
RPM = typer.Option(None, "--rpm", min=1, help="Requests per minute.")
TPM = typer.Option(None, "--tpm", min=1, help="Tokens per minute.")
RPD = typer.Option(None, "--rpd", min=1, help="Requests per day.")
TPD = typer.Option(None, "--tpd", min=1, help="Tokens per day.")
ON_EXCESS_OPTION = typer.Option(
    "refuse", "--on-excess", help="Over a limit: 'refuse' (429) or 'queue' (wait for a slot).")


def key_limits(rps: int | None, rpm: int | None, tpm: int | None, rpd: int | None,
               tpd: int | None, on_excess: str) -> RateLimit | None:
    """The limits the options give (None: no count given)."""
    if on_excess not in ON_EXCESS:
        raise typer.BadParameter(f"'{on_excess}' is not one of {', '.join(ON_EXCESS)}",
                                 param_hint="--on-excess")
    if all(v is None for v in (rps, rpm, tpm, rpd, tpd)):
        return None
    return RateLimit("", requests_per_second=rps, requests_per_minute=rpm,
                     tokens_per_minute=tpm, requests_per_day=rpd, tokens_per_day=tpd,
                     on_excess="queue" if on_excess == "queue" else "refuse")


def _limits_text(info: KeyInfo) -> str:
    if info.limits is None:
        return "-"
    shown = [f"{n.replace('requests_per_', 'r/').replace('tokens_per_', 't/')}={v}"
             for n, v in info.limits.counts().items() if v is not None]
    return " ".join([*shown, info.limits.on_excess])


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
    rps: int | None = RPS, rpm: int | None = RPM, tpm: int | None = TPM,
    rpd: int | None = RPD, tpd: int | None = TPD,
    on_excess: str = ON_EXCESS_OPTION,
    as_json: bool = typer.Option(False, "--json", help="Print the key and its record as JSON."),
) -> None:
    """Create a key; it is printed once and stored only as a hash. --rps/--rpm/--tpm/
    --rpd/--tpd are the key's own rate limits, applied beside its agent's."""
    created = create_key(agent, acts_for=acts_for or (), admin=admin,
                         expires_at=parse_expiry(expires), note=note,
                         respond_async=respond_async,
                         limits=key_limits(rps, rpm, tpm, rpd, tpd, on_excess))
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


@cli.command("set-limits")
def set_limits(
    prefix: str = typer.Argument(..., help="The key's prefix (amk_...) or the key."),
    rps: int | None = RPS, rpm: int | None = RPM, tpm: int | None = TPM,
    rpd: int | None = RPD, tpd: int | None = TPD,
    on_excess: str = ON_EXCESS_OPTION,
    clear: bool = typer.Option(False, "--clear", help="Remove the key's own limits."),
) -> None:
    """Replace a key's own rate limits (every router applies them to its next message)."""
    limits = key_limits(rps, rpm, tpm, rpd, tpd, on_excess)
    if (limits is None) != clear:
        raise typer.BadParameter("give at least one of --rps, --rpm, --tpm, --rpd, --tpd, "
                                 "or --clear alone", param_hint="--rpm")
    info = set_key_limits(prefix, limits)
    typer.echo(f"limits of {info.prefix} (agent {info.agent_id}): {_limits_text(info)}")


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
    rows = table("prefix", "agent", "acts for", "admin", "state", "expires", "limits")
    for info in keys:
        state = ("revoked" if info.revoked_at else "active" if info.usable(now) else "expired")
        expiry = info.expires_at.strftime("%Y-%m-%d %H:%M") if info.expires_at else "-"
        rows.add_row(info.prefix, info.agent_id, ",".join(info.acts_for) or "-",
                     "yes" if info.admin else "no", state, expiry, _limits_text(info))
    stdout().print(rows)
