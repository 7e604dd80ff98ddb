"""`aimesh worker`: a Celery worker for the router queue and/or endpoint queues.

With `--serve` (or `--serve-file`) the worker joins the cluster with the endpoints it
fronts: it announces them before it starts (registry/announce.py: the registration
token, the upstream URL policy, conflicts with the registry), consumes their queues, and
beats while it does (aimesh_tasks/serving.py).
"""

from __future__ import annotations

import os
import shutil
import sys
from dataclasses import dataclass
from typing import Any

import typer

from aimesh_tasks.app import app, check_delivery_settings
from aimesh_tasks.cli.nodes import default_node_name
from aimesh_tasks.errors import InvalidInput
from aimesh_tasks.follow import FOLLOW_SETTING
from aimesh_tasks.keys import IDLE_QUEUE, ROUTE_QUEUE, endpoint_queue
from aimesh_tasks.rabbit.preflight import check_queues
from aimesh_tasks.registry.endpoints import EndpointSpec, list_endpoints

SERVES_VARIABLE = "AIMESH_WORKER_SERVES"


def worker_queues(router: bool, endpoints: str | None, queues: str | None,
                  serves: list[str] | None = None) -> list[str]:
    """The queues a worker consumes: explicit ones, the router's, endpoint queues (every
    operator endpoint for 'all'), and those of the endpoints it serves."""
    chosen = [q for q in (queues or "").split(",") if q]
    if router:
        chosen.append(ROUTE_QUEUE)
    chosen.extend(endpoint_queue(i) for i in serves or [])
    if endpoints == "all":
        chosen.extend(endpoint_queue(e.id) for e in list_endpoints(include_disabled=False)
                      if not e.announced)
        chosen = chosen or [IDLE_QUEUE]
    elif endpoints:
        chosen.extend(endpoint_queue(e) for e in known_endpoints(endpoints.split(","),
                                                                 serves or []))
    if not chosen:
        raise typer.BadParameter("give --router, --endpoints, --serve or --queues",
                                 param_hint="queues")
    return list(dict.fromkeys(chosen))


def known_endpoints(ids: list[str], serves: list[str] | None = None) -> list[str]:
    """The ids given, refused (InvalidInput, listing the known ids) if one is unknown: a
    worker would otherwise consume a queue nothing is ever routed to; or self-registered
    and not served here: only its servers call it."""
    wanted = [i.strip() for i in ids if i.strip()]
    registered = {e.id: e for e in list_endpoints()}
    known = sorted(registered)
    unknown = [i for i in wanted if i not in known]
    if unknown:
        names = ", ".join(f"'{i}'" for i in unknown)
        raise InvalidInput(
            f"--endpoints: no endpoint {names} in the registry; known: "
            f"{', '.join(known) if known else 'none yet (`aimesh endpoints add`)'} "
            "(or --endpoints all to follow every enabled endpoint)",
            field="endpoints", errors=[])
    theirs = [i for i in wanted if registered[i].announced and i not in (serves or [])]
    if theirs:
        raise InvalidInput(
            f"--endpoints: '{theirs[0]}' is self-registered: only the workers that serve it "
            f"call it (`aimesh worker --serve {theirs[0]} ...` with its registered values)",
            field="endpoints", errors=[])
    return wanted


@dataclass(frozen=True)
class ServeOptions:
    """The `--serve` options of one endpoint, as given (None: not given)."""

    endpoint_id: str | None
    serve_file: str | None
    url: str | None
    model: str | None
    provider: str
    price_in: str | None
    price_out: str | None
    capacity: int
    tags: str
    api_key_env: str | None
    api_key_file: str | None

    def specs(self) -> list[EndpointSpec]:
        """The endpoints this worker announces (none without --serve or --serve-file)."""
        from aimesh_tasks.registry.announce import parse_announcement, read_serve_file

        given = [f"--{n}" for n, v in (("url", self.url), ("model", self.model),
                                        ("price-in", self.price_in),
                                        ("price-out", self.price_out)) if v is not None]
        if self.serve_file is not None:
            if self.endpoint_id or given:
                raise InvalidInput("--serve-file: give the endpoints in the file, or one with "
                                   "--serve and its options, not both", field="serve_file",
                                   errors=[])
            return read_serve_file(self.serve_file)
        if self.endpoint_id is None:
            if given:
                raise InvalidInput(f"{given[0]}: describes the endpoint of --serve ID; give "
                                   "--serve too", field="serve", errors=[])
            return []
        missing = [f"--{n}" for n, v in (("url", self.url), ("model", self.model),
                                          ("price-in", self.price_in),
                                          ("price-out", self.price_out)) if v is None]
        if missing:
            raise InvalidInput(f"{missing[0]}: --serve {self.endpoint_id} needs "
                               f"{', '.join(missing)} (prices in USD per 1k tokens; 0 for a "
                               "free local model)", field="serve", errors=[])
        return [parse_announcement(self._fields())]

    def _fields(self) -> dict[str, Any]:
        fields: dict[str, Any] = {
            "id": self.endpoint_id, "base_url": self.url, "model": self.model,
            "provider": self.provider, "input_usd_per_1k": self.price_in,
            "output_usd_per_1k": self.price_out, "capacity": self.capacity,
            "tags": [t for t in self.tags.split(",") if t]}
        if self.api_key_env is not None:
            fields["api_key_env"] = self.api_key_env
        if self.api_key_file is not None:
            fields["api_key_file"] = self.api_key_file
        return fields


def announce_served(specs: list[EndpointSpec], node: str) -> list[str]:
    """Announce `specs` for the worker named `node`, say what happened, and name them in
    AIMESH_WORKER_SERVES for the worker that starts next (and its pool processes)."""
    from celery.utils.nodenames import host_format

    from aimesh_tasks.registry.announce import announce
    from aimesh_tasks.settings import get_settings, reset_settings

    if get_settings().worker_serves:
        raise InvalidInput(f"{SERVES_VARIABLE}: set by `aimesh worker --serve` once it "
                           "announced the endpoints; use --serve instead of setting it",
                           field=SERVES_VARIABLE, errors=[])
    if not specs:
        return []
    for one in announce(specs, worker=host_format(node)):
        how = ("created it" if one.created else "joined it (self-registered)"
               if one.endpoint.announced else "joined it (an operator's endpoint)")
        typer.echo(f"serving endpoint {one.endpoint.id}: announced, {how}; queue "
                   f"{one.endpoint.queue}")
    sys.stdout.flush()  # before the worker takes stdout over for its log
    ids = [spec.id for spec in specs]
    os.environ[SERVES_VARIABLE] = ",".join(ids)
    reset_settings()
    return ids


def worker(
    ctx: typer.Context,
    router: bool = typer.Option(False, "--router", help="Consume the routing queue."),
    endpoints: str = typer.Option(
        None, "--endpoints", help="'all' (every enabled endpoint) or comma-separated ids."
    ),
    queues: str = typer.Option(None, "--queues", "-Q", help="Comma-separated queue names."),
    pool: str = typer.Option("prefork", "--pool", "-P", help="prefork, threads or gevent."),
    concurrency: int = typer.Option(None, "--concurrency", "-c", help="Processes/threads."),
    loglevel: str = typer.Option("INFO", "--loglevel", "-l"),
    hostname: str = typer.Option(None, "--hostname", "-n", help="Worker node name."),
    serve: str = typer.Option(None, "--serve", help=(
        "Announce this endpoint id and serve it: needs --url, --model, --price-in and "
        "--price-out, and the cluster's registration token (AIMESH_REGISTRATION_TOKEN).")),
    serve_file: str = typer.Option(None, "--serve-file", help=(
        "Announce and serve the endpoints of this YAML file (`endpoints:`, each with the "
        "fields of `aimesh endpoints add`).")),
    url: str = typer.Option(None, "--url", help="--serve: the upstream's base URL."),
    model: str = typer.Option(None, "--model", help="--serve: the model it serves."),
    provider: str = typer.Option("openai", "--provider", help="--serve: its wire format."),
    price_in: str = typer.Option(None, "--price-in", "--input-price",
                                 help="--serve: USD per 1k input tokens."),
    price_out: str = typer.Option(None, "--price-out", "--output-price",
                                  help="--serve: USD per 1k output tokens."),
    capacity: int = typer.Option(64, "--capacity", help="--serve: most calls in flight."),
    tags: str = typer.Option("", "--tags", help="--serve: comma-separated capabilities."),
    api_key_env: str = typer.Option(None, "--api-key-env",
                                    help="--serve: variable holding its API key, if any."),
    api_key_file: str = typer.Option(None, "--api-key-file",
                                     help="--serve: file holding its API key, if any."),
) -> None:
    """Run a worker. Extra arguments go to `celery worker` unchanged.

    Examples: `aimesh worker --router -P prefork -c 2`;
    `aimesh worker --endpoints all -P threads -c 1000` (a thousand calls in flight in one
    process; its connection pools are sized from -c: aimesh_tasks/pools.py);
    `aimesh worker --serve local-llama --url http://127.0.0.1:11434 --model llama3.1
    --price-in 0 --price-out 0 -P threads -c 8`.
    """
    check_delivery_settings()
    specs = ServeOptions(serve, serve_file, url, model, provider, price_in, price_out,
                         capacity, tags, api_key_env, api_key_file).specs()
    ids = [spec.id for spec in specs]
    node = hostname or default_node_name(router, endpoints, queues, serves=ids)
    chosen = worker_queues(router, endpoints, queues, ids)  # before announcing: the checks
    check_queues(app, chosen)  # RabbitMQ: a queue made with other arguments is refused here
    announce_served(specs, node)
    argv = ["worker", "-Q", ",".join(chosen), "-P", pool, "-l", loglevel]
    if concurrency:
        argv += ["-c", str(concurrency)]
    argv += ["-n", node]
    argv += list(ctx.args)
    if pool in GREEN_POOLS:
        _exec_celery(argv, follow=endpoints == "all")
    app.conf[FOLLOW_SETTING] = endpoints == "all"
    status = run_celery(argv)
    if status:
        raise typer.Exit(status)


def run_celery(argv: list[str]) -> int:
    """Run `celery <argv>` on the app in this process; Celery's exit status.

    `app.worker_main()` (through `app.start()`) drops the status that `celery worker`
    returns, so a worker that stops on an unrecoverable error would exit 0 and a
    supervisor that restarts on failure would leave it dead.
    """
    from celery.bin.celery import celery

    celery.params[0].default = app  # what app.start() does: the --app option's default
    try:
        status = celery.main(args=argv, standalone_mode=False)
    finally:
        celery.params[0].default = None
    return status if isinstance(status, int) else 0


# gevent and eventlet must monkey-patch before anything imports threading or sockets; by
# now this process has imported both, so the worker starts afresh under the celery
# command, which patches first.
GREEN_POOLS = ("gevent", "eventlet")


def _exec_celery(argv: list[str], *, follow: bool) -> None:
    celery = shutil.which("celery", path=os.path.dirname(sys.executable)) or "celery"
    env = {**os.environ, "AIMESH_WORKER_FOLLOW_ENDPOINTS": "1" if follow else "0"}
    os.execve(celery, [celery, "-A", "aimesh_tasks.app", *argv], env)
