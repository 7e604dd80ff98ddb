"""`aimesh endpoints`: the endpoint registry and its live figures."""

from __future__ import annotations

import json

import typer

from aimesh_tasks.cli.shell import stdout, table
from aimesh_tasks.errors import InvalidInput
from aimesh_tasks.registry import endpoints as registry
from aimesh_tasks.registry.live import LiveFigures, read_figures

cli = typer.Typer(help="Model endpoints: prices, capacity, live figures.", no_args_is_help=True)


def _latency(live: LiveFigures) -> str:
    if live.p50_ms is None or live.p99_ms is None:
        return "-"
    return f"{live.p50_ms:.0f}/{live.p99_ms:.0f}"


@cli.command("list")
def list_(as_json: bool = typer.Option(False, "--json", help="One JSON object per line.")) -> None:
    """Every endpoint with its prices, capacity and live figures."""
    endpoints = registry.list_endpoints()
    figures, _ = read_figures(e.id for e in endpoints)
    if as_json:
        for e in endpoints:
            typer.echo(json.dumps({**e.to_dict(), "live": figures[e.id].to_dict()}))
        return
    if not endpoints:
        typer.echo("no endpoints registered; add one with `aimesh endpoints add ID --url URL "
                   "--model MODEL --input-price USD --output-price USD`")
        return
    rows = table("id", "provider", "model", "$/1k in/out", "capacity", "enabled", "in flight",
                 "p50/p99 ms", "errors", "health")
    for e in endpoints:
        live = figures.get(e.id, LiveFigures())
        d = e.to_dict()
        rows.add_row(e.id, e.provider, e.model,
                     f"{d['input_usd_per_1k']}/{d['output_usd_per_1k']}", str(e.capacity),
                     "yes" if e.enabled else "no", str(live.in_flight), _latency(live),
                     f"{live.error_rate:.1%}", live.health)
    stdout().print(rows)


@cli.command("add")
def add(
    endpoint_id: str = typer.Argument(..., help="Id, lowercase kebab or snake case."),
    base_url: str = typer.Option(..., "--url", help="Base URL, e.g. http://127.0.0.1:8000"),
    model: str = typer.Option(..., "--model"),
    input_price: str = typer.Option(..., "--input-price", help="USD per 1k input tokens."),
    output_price: str = typer.Option(..., "--output-price", help="USD per 1k output tokens."),
    provider: str = typer.Option("openai", "--provider"),
    capacity: int = typer.Option(64, "--capacity", help="Most calls in flight at once."),
    tags: str = typer.Option("", "--tags", help="Comma-separated capabilities."),
    api_key_env: str = typer.Option(None, "--api-key-env", help="Env var holding the key."),
) -> None:
    """Register an endpoint."""
    endpoint = registry.add_endpoint(
        id=endpoint_id, base_url=base_url, model=model, input_usd_per_1k=input_price,
        output_usd_per_1k=output_price, provider=provider, capacity=capacity,
        tags=[t for t in tags.split(",") if t], api_key_env=api_key_env,
    )
    typer.echo(f"added endpoint {endpoint.id} (queue {endpoint.queue})")


@cli.command("update")
def update(
    endpoint_id: str = typer.Argument(...),
    base_url: str = typer.Option(None, "--url"),
    model: str = typer.Option(None, "--model"),
    input_price: str = typer.Option(None, "--input-price"),
    output_price: str = typer.Option(None, "--output-price"),
    capacity: int = typer.Option(None, "--capacity"),
    tags: str = typer.Option(None, "--tags"),
) -> None:
    """Change some fields of an endpoint."""
    changes = {
        "base_url": base_url, "model": model, "input_usd_per_1k": input_price,
        "output_usd_per_1k": output_price, "capacity": capacity,
        "tags": None if tags is None else [t for t in tags.split(",") if t],
    }
    given = {k: v for k, v in changes.items() if v is not None}
    if not given:
        raise InvalidInput("nothing to change: give at least one of --url, --model, "
                           "--input-price, --output-price, --capacity, --tags",
                           field="endpoint", errors=[])
    registry.update_endpoint(endpoint_id, **given)
    typer.echo(f"updated endpoint {endpoint_id}")


@cli.command("disable")
def disable(endpoint_id: str) -> None:
    """Stop routing to an endpoint."""
    registry.set_enabled(endpoint_id, False)
    typer.echo(f"disabled endpoint {endpoint_id}")


@cli.command("enable")
def enable(endpoint_id: str) -> None:
    """Route to an endpoint again."""
    registry.set_enabled(endpoint_id, True)
    typer.echo(f"enabled endpoint {endpoint_id}")


@cli.command("remove")
def remove(endpoint_id: str) -> None:
    """Delete an endpoint from the registry."""
    registry.remove_endpoint(endpoint_id)
    typer.echo(f"removed endpoint {endpoint_id}")
