"""`aimesh routes`: apply a routes file (routes and rate limits), list, show, remove."""

from __future__ import annotations

import json

import typer

from aimesh_tasks.cli.shell import stdout, table
from aimesh_tasks.governance import limits, routes, spec_file

cli = typer.Typer(help="Routes: intents, targets and ACLs; agents' rate limits.",
                  no_args_is_help=True)


@cli.command("apply")
def apply(path: str = typer.Argument(..., help="A routes file, .yaml/.yml or .json.")) -> None:
    """Create or replace the file's routes and rate limits (all or nothing)."""
    spec = spec_file.apply_file(path)
    typer.echo(f"applied {len(spec.routes)} route(s): "
               f"{', '.join(r.name for r in spec.routes) or '-'}; rate limits set for "
               f"{len(spec.limits)} agent(s), removed for {len(spec.remove_limits)}")


@cli.command("list")
def list_(as_json: bool = typer.Option(False, "--json", help="One JSON object per line.")) -> None:
    """Every route."""
    found = routes.list_routes()
    if as_json:
        for route in found:
            typer.echo(json.dumps(route.to_dict()))
        return
    if not found:
        typer.echo("no routes defined: every endpoint serves every message; define routes "
                   "with `aimesh routes apply routes.yaml`")
        return
    rows = table("name", "target", "allowed", "intents", "fallback")
    for route in found:
        shown = route.to_dict()
        allowed = shown["allowed"]
        rows.add_row(route.name, json.dumps(shown["target"]),
                     "open" if allowed is None else allowed if isinstance(allowed, str)
                     else ", ".join(allowed), str(len(route.intents)), route.fallback or "-")
    stdout().print(rows)


@cli.command("show")
def show(name: str = typer.Argument(..., help="The route's name.")) -> None:
    """One route as JSON."""
    typer.echo(json.dumps(routes.get_route(name).to_dict(), indent=2))


@cli.command("remove")
def remove(name: str = typer.Argument(..., help="The route's name.")) -> None:
    """Remove a route (refused while another route falls back to it)."""
    routes.remove_route(name)
    typer.echo(f"removed route {name}")


@cli.command("limits")
def limits_(as_json: bool = typer.Option(False, "--json", help="One JSON object per line.")
            ) -> None:
    """Every agent's rate limits."""
    found = limits.list_rate_limits()
    if as_json:
        for limit in found:
            typer.echo(json.dumps(limit.to_dict()))
        return
    rows = table("agent", *limits.LIMIT_NAMES, "on_excess")
    for limit in found:
        shown = limit.counts()
        rows.add_row(limit.agent_id, *("-" if shown[n] is None else str(shown[n])
                                       for n in limits.LIMIT_NAMES), limit.on_excess)
    stdout().print(rows)
