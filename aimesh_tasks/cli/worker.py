"""`aimesh worker`: a Celery worker for the router queue and/or endpoint queues."""

from __future__ import annotations

import typer

from aimesh_tasks.app import app, check_delivery_settings
from aimesh_tasks.follow import FOLLOW_SETTING
from aimesh_tasks.keys import IDLE_QUEUE, ROUTE_QUEUE, endpoint_queue
from aimesh_tasks.registry.endpoints import list_endpoints


def worker_queues(router: bool, endpoints: str | None, queues: str | None) -> list[str]:
    """The queues a worker consumes: explicit ones, the router's, and endpoint queues."""
    chosen = [q for q in (queues or "").split(",") if q]
    if router:
        chosen.append(ROUTE_QUEUE)
    if endpoints == "all":
        chosen.extend(endpoint_queue(e.id) for e in list_endpoints(include_disabled=False))
        chosen = chosen or [IDLE_QUEUE]
    elif endpoints:
        chosen.extend(endpoint_queue(e) for e in endpoints.split(",") if e)
    if not chosen:
        raise typer.BadParameter("give --router, --endpoints or --queues", param_hint="queues")
    return list(dict.fromkeys(chosen))


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
) -> None:
    """Run a worker. Extra arguments go to `celery worker` unchanged.

    Examples: `aimesh worker --router -P prefork -c 2`;
    `aimesh worker --endpoints all -P threads -c 64`.
    """
    check_delivery_settings()
    if endpoints == "all":
        app.conf[FOLLOW_SETTING] = True
    argv = ["worker", "-Q", ",".join(worker_queues(router, endpoints, queues)), "-P", pool,
            "-l", loglevel]
    if concurrency:
        argv += ["-c", str(concurrency)]
    if hostname:
        argv += ["-n", hostname]
    app.worker_main(argv + list(ctx.args))
