"""`aimesh worker`: a Celery worker for the router queue and/or endpoint queues."""

from __future__ import annotations

import os
import shutil
import sys

import typer

from aimesh_tasks.app import app, check_delivery_settings
from aimesh_tasks.cli.nodes import default_node_name
from aimesh_tasks.errors import InvalidInput
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
        chosen.extend(endpoint_queue(e) for e in known_endpoints(endpoints.split(",")))
    if not chosen:
        raise typer.BadParameter("give --router, --endpoints or --queues", param_hint="queues")
    return list(dict.fromkeys(chosen))


def known_endpoints(ids: list[str]) -> list[str]:
    """The ids given, refused (InvalidInput, listing the known ids) if one is unknown: a
    worker would otherwise consume a queue nothing is ever routed to."""
    wanted = [i.strip() for i in ids if i.strip()]
    known = sorted(e.id for e in list_endpoints())
    unknown = [i for i in wanted if i not in known]
    if unknown:
        names = ", ".join(f"'{i}'" for i in unknown)
        raise InvalidInput(
            f"--endpoints: no endpoint {names} in the registry; known: "
            f"{', '.join(known) if known else 'none yet (`aimesh endpoints add`)'} "
            "(or --endpoints all to follow every enabled endpoint)",
            field="endpoints", errors=[])
    return wanted


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
    argv = ["worker", "-Q", ",".join(worker_queues(router, endpoints, queues)), "-P", pool,
            "-l", loglevel]
    if concurrency:
        argv += ["-c", str(concurrency)]
    argv += ["-n", hostname or default_node_name(router, endpoints, queues)]
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
