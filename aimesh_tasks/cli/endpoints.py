"""`aimesh endpoints`: the endpoint registry, its live figures, and a test call.

`list` shows who serves each endpoint: the workers that announced it (`aimesh worker
--serve`), each with when it was last seen; a self-registered endpoint none of whose
servers is live is not routed to ("down" in the servers column).

API keys: an endpoint names where its key is, never the key: `--api-key-env NAME` (a
variable in each endpoint worker's environment) or `--api-key-file PATH` (a file on each
endpoint worker, such as a mounted Kubernetes Secret, read again when it changes).
"""

from __future__ import annotations

import json
from typing import Any

import typer

from aimesh_tasks.cli.shell import EXIT_FAILED, stdout, table
from aimesh_tasks.errors import InvalidInput
from aimesh_tasks.registry import endpoints as registry
from aimesh_tasks.registry.key_reports import workers_missing_keys
from aimesh_tasks.registry.live import LiveFigures, read_figures
from aimesh_tasks.registry.servers import Server, servers_of
from aimesh_tasks.resilience.breaker_store import breaker_states

cli = typer.Typer(help="Model endpoints: prices, capacity, keys, live figures, a test call.",
                  no_args_is_help=True)
KEY_ENV_HELP = ("Name of the environment variable holding the API key on the endpoint's "
                "workers (the name, never the key).")
KEY_FILE_HELP = ("Path of a file holding the API key on the endpoint's workers (e.g. a "
                 "mounted Kubernetes Secret); read again when it changes.")


def _latency(live: LiveFigures) -> str:
    if live.p50_ms is None or live.p99_ms is None:
        return "-"
    return f"{live.p50_ms:.0f}/{live.p99_ms:.0f}"


def _key(endpoint: registry.Endpoint, missing_on: list[str]) -> str:
    where = (f"env {endpoint.api_key_env}" if endpoint.api_key_env
             else f"file {endpoint.api_key_file}" if endpoint.api_key_file else "-")
    if missing_on:
        return f"{where} (missing on {len(missing_on)} worker{'s' * (len(missing_on) > 1)})"
    return where


def _seen(server: Server, now: float, down_after_s: float) -> dict[str, Any]:
    return {"worker": server.worker, "last_seen_s_ago": round(now - server.last_seen, 1),
            "live": server.live(now, down_after_s)}


def _servers(endpoint: registry.Endpoint, seen: list[dict[str, Any]]) -> str:
    """'2 live', 'down' (self-registered, none live) or '-' (an operator's, none)."""
    live = sum(1 for s in seen if s["live"])
    if live:
        return f"{live} live"
    return "down" if endpoint.announced else "-"


def _served_by(endpoint: registry.Endpoint, seen: list[dict[str, Any]]) -> str:
    origin = "self-registered" if endpoint.announced else "an operator's"
    if not seen:
        return f"endpoint {endpoint.id} ({origin}): no worker serves it lately; not routed to"
    each = ", ".join(f"{s['worker']} (last seen {s['last_seen_s_ago']:g} s ago"
                     f"{'' if s['live'] else ', not live'})" for s in seen)
    return f"endpoint {endpoint.id} ({origin}): served by {each}"


@cli.command("list")
def list_(as_json: bool = typer.Option(False, "--json", help="One JSON object per line.")) -> None:
    """Every endpoint with its prices, capacity, key source, live figures and servers (the
    workers that announced it, with when each was last seen); a worker that serves an
    endpoint without its key is named ("key missing on this worker")."""
    import time

    from aimesh_tasks.cli.shell import get_settings

    endpoints = registry.list_endpoints()
    figures, _ = read_figures(e.id for e in endpoints)
    missing = workers_missing_keys(e.id for e in endpoints)
    breakers = breaker_states([e.id for e in endpoints])
    now, down_after_s = time.time(), get_settings().serve_down_after_s
    seen = {i: [_seen(s, now, down_after_s) for s in found]
            for i, found in servers_of(e.id for e in endpoints).items()}
    if as_json:
        for e in endpoints:
            typer.echo(json.dumps({**e.to_dict(), "live": figures[e.id].to_dict(),
                                   "key_missing_on": missing[e.id], "breaker": breakers[e.id],
                                   "servers": seen[e.id]}))
        return
    if not endpoints:
        typer.echo("no endpoints registered; add one with `aimesh endpoints add ID --url URL "
                   "--model MODEL --input-price USD --output-price USD`")
        return
    served = any(e.announced or seen[e.id] for e in endpoints)
    rows = table("id", "provider", "url", "model", "$/1k in/out", "capacity", "enabled",
                 "in flight", "p50/p99 ms", "errors", "health", "breaker", "key",
                 *(["servers"] if served else []))
    for e in endpoints:
        live = figures.get(e.id, LiveFigures())
        d = e.to_dict()
        rows.add_row(e.id, e.provider, e.base_url, e.model,
                     f"{d['input_usd_per_1k']}/{d['output_usd_per_1k']}", str(e.capacity),
                     "yes" if e.enabled else "no", str(live.in_flight), _latency(live),
                     f"{live.error_rate:.1%}", live.health, breakers[e.id],
                     _key(e, missing[e.id]), *([_servers(e, seen[e.id])] if served else []))
    stdout().print(rows)
    for e in endpoints:
        if e.announced or seen[e.id]:
            typer.echo(_served_by(e, seen[e.id]))
    for e in endpoints:
        if missing[e.id]:
            typer.echo(f"endpoint {e.id}: key missing on this worker: "
                       f"{', '.join(missing[e.id])} (its calls there fail with key_missing and "
                       "fall back; the worker's log says why)")


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
    api_key_env: str = typer.Option(None, "--api-key-env", help=KEY_ENV_HELP),
    api_key_file: str = typer.Option(None, "--api-key-file", help=KEY_FILE_HELP),
    exist_ok: bool = typer.Option(False, "--exist-ok",
                                  help="An endpoint with this id already registered is left as "
                                       "it is (exit 0): for scripts that run more than once."),
) -> None:
    """Register an endpoint (then `aimesh endpoints test ID` makes one call to it)."""
    if exist_ok and endpoint_id in {e.id for e in registry.list_endpoints()}:
        typer.echo(f"endpoint {endpoint_id} is registered already; `aimesh endpoints update "
                   f"{endpoint_id}` changes it")
        return
    endpoint = registry.add_endpoint(
        id=endpoint_id, base_url=base_url, model=model, input_usd_per_1k=input_price,
        output_usd_per_1k=output_price, provider=provider, capacity=capacity,
        tags=[t for t in tags.split(",") if t], api_key_env=api_key_env,
        api_key_file=api_key_file,
    )
    typer.echo(f"added endpoint {endpoint.id} (queue {endpoint.queue})")
    _note_url(base_url, endpoint)


def _note_url(given: str, endpoint: registry.Endpoint) -> None:
    from aimesh_tasks.registry.upstream import check_operator_url

    if given.rstrip("/") != endpoint.base_url:
        typer.echo(f"note: stored the base URL as {endpoint.base_url}: the "
                   f"{endpoint.provider} adapter adds {registry.api_path(endpoint.provider)}")
    if not check_operator_url(endpoint.base_url):
        typer.echo(f"note: the host of {endpoint.base_url} does not resolve from here; its "
                   "workers resolve it when they call it, and refuse an address the upstream "
                   "URL policy refuses (AIMESH_UPSTREAM_ALLOW_PRIVATE)")


@cli.command("update")
def update(
    endpoint_id: str = typer.Argument(...),
    base_url: str = typer.Option(None, "--url"),
    model: str = typer.Option(None, "--model"),
    input_price: str = typer.Option(None, "--input-price"),
    output_price: str = typer.Option(None, "--output-price"),
    capacity: int = typer.Option(None, "--capacity"),
    tags: str = typer.Option(None, "--tags"),
    api_key_env: str = typer.Option(None, "--api-key-env", help=KEY_ENV_HELP),
    api_key_file: str = typer.Option(None, "--api-key-file", help=KEY_FILE_HELP),
    no_api_key: bool = typer.Option(False, "--no-api-key",
                                    help="The endpoint needs no key: clear both."),
) -> None:
    """Change some fields of an endpoint; a new key source replaces the old one."""
    changes = {
        "base_url": base_url, "model": model, "input_usd_per_1k": input_price,
        "output_usd_per_1k": output_price, "capacity": capacity,
        "tags": None if tags is None else [t for t in tags.split(",") if t],
        "api_key_env": api_key_env, "api_key_file": api_key_file,
    }
    given: dict[str, Any] = {k: v for k, v in changes.items() if v is not None}
    if no_api_key:
        if api_key_env or api_key_file:
            raise InvalidInput("--no-api-key clears the key source: give it alone, or give "
                               "--api-key-env or --api-key-file", field="api_key_env",
                               errors=[])
        given.update(api_key_env=None, api_key_file=None)
    if not given:
        raise InvalidInput("nothing to change: give at least one of --url, --model, "
                           "--input-price, --output-price, --capacity, --tags, "
                           "--api-key-env, --api-key-file, --no-api-key",
                           field="endpoint", errors=[])
    endpoint = registry.update_endpoint(endpoint_id, **given)
    typer.echo(f"updated endpoint {endpoint_id}")
    if base_url is not None:
        _note_url(base_url, endpoint)


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


_ACTIONS = {
    "fallback": "the endpoint's fault: it counts against its health and a route falls back "
                "to its next endpoint",
    "retry": "a short overload: the call is tried again later",
    "fail": "the message's fault: it fails without a fallback",
}


@cli.command("test")
def probe_command(
    endpoint_id: str = typer.Argument(...),
    prompt: str = typer.Option("Reply with the word OK.", "--prompt"),
    max_tokens: int = typer.Option(16, "--max-tokens", min=1),
    as_json: bool = typer.Option(False, "--json", help="One JSON object."),
) -> None:
    """Make one small call to an endpoint from this shell, with this shell's key (the
    variable or file the endpoint names), and report status, latency, tokens and the
    error if any. Not charged to any agent; exit 1 if the call failed."""
    from aimesh_tasks.messages import AiMessage
    from aimesh_tasks.money import call_cost_nusd, nusd_to_usd
    from aimesh_tasks.providers.credentials import describe
    from aimesh_tasks.providers.http import probe

    endpoint = registry.get_endpoint(endpoint_id)
    message = AiMessage(agent_id="endpoint-test", prompt=prompt, max_tokens=max_tokens)
    done = probe(endpoint, message)
    report: dict[str, Any] = {"endpoint_id": endpoint.id, "ok": done.ok,
                              "latency_ms": done.latency_ms}
    if done.completion is not None:
        c = done.completion
        cost = call_cost_nusd(c.input_tokens, c.output_tokens, endpoint.input_nusd_per_1k,
                              endpoint.output_nusd_per_1k)
        report.update(status=200, input_tokens=c.input_tokens, output_tokens=c.output_tokens,
                      cost_usd=str(nusd_to_usd(cost)), finish_reason=c.finish_reason,
                      text=c.text)
    elif done.error is not None:
        report.update(status=done.error.status, error=done.error.to_dict())
    if as_json:
        typer.echo(json.dumps(report))
    else:
        typer.echo(f"endpoint {endpoint.id}: {endpoint.provider} model {endpoint.model} at "
                   f"{endpoint.base_url}, key from {describe(endpoint) or 'nowhere (none)'}")
        typer.echo(_summary(report))
    if not done.ok:
        raise typer.Exit(EXIT_FAILED)


def _summary(report: dict[str, Any]) -> str:
    took = f"{report['latency_ms']:.0f} ms"
    if report["ok"]:
        return (f"ok: HTTP 200 in {took}, {report['input_tokens']} input + "
                f"{report['output_tokens']} output tokens (${report['cost_usd']}), finish "
                f"{report['finish_reason']}\nanswer: {report['text'][:200]}")
    error = report["error"]
    status = f"HTTP {error['status']}" if error.get("status") else "no HTTP answer"
    action = str(error.get("action", "fallback"))
    return (f"failed: {status} in {took}, {error.get('reason')} (action {action}: "
            f"{_ACTIONS.get(action, action)})\n{error['message']}")
