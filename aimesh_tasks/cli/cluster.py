"""`aimesh cluster up|status|down`: a local cluster of worker processes on real servers.

`up` starts, in the background, a router worker (prefork: routing is CPU work) and an
endpoint worker following every endpoint (threads: calls wait on providers), optionally
a simulated provider, waits until each answers, and records them in DIR/cluster.json
with their logs beside it. Run again while up, it says so and changes nothing; `down`
stops what `up` started. Production deployments use `docker-compose.yml` or `deploy/`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import typer

from aimesh_tasks.cli.local_cluster import Spawned, alive, spawn, stop, wait_ready, worker_node
from aimesh_tasks.cli.nodes import node_role
from aimesh_tasks.cli.shell import check_servers, fail, stdout, table

cli = typer.Typer(help="A local cluster of worker processes on real servers.",
                  no_args_is_help=True)
STATE_FILE = "cluster.json"
DEFAULT_DIR = ".aimesh-cluster"
DirOption = typer.Option(DEFAULT_DIR, "--dir", help="Where the state file and logs go.")


def _load(state_dir: Path) -> list[Spawned]:
    path = state_dir / STATE_FILE
    if not path.exists():
        return []
    return [Spawned(**entry) for entry in json.loads(path.read_text())["processes"]]


def _save(state_dir: Path, processes: list[Spawned]) -> None:
    (state_dir / STATE_FILE).write_text(json.dumps(
        {"processes": [p.to_dict() for p in processes]}, indent=2))


def _start(state_dir: Path, router_c: int, endpoint_c: int, simulator_port: int | None
           ) -> list[Spawned]:
    started: list[Spawned] = []
    if simulator_port:
        started.append(spawn("simulator", ["simulate", "--port", str(simulator_port)],
                             state_dir, port=simulator_port))
    for role, argv in (
        (node_role(True, None, None), ["--router", "-P", "prefork", "-c", str(router_c)]),
        (node_role(False, "all", None), ["--endpoints", "all", "-P", "threads", "-c",
                                         str(endpoint_c)]),
    ):
        process = spawn(role, ["worker", *argv], state_dir)
        # `aimesh worker` names itself <role>-<pid>@<host>: the pid is known only now.
        started.append(Spawned(process.role, process.pid, process.log,
                               node=worker_node(role, process.pid)))
    return started


@cli.command("up")
def up(
    router_concurrency: int = typer.Option(2, "--router-concurrency",
                                           help="Router processes (prefork): one per core."),
    endpoint_concurrency: int = typer.Option(
        64, "--endpoint-concurrency", help="Endpoint worker threads: calls in flight."),
    simulate: int = typer.Option(None, "--simulate", metavar="PORT",
                                 help="Also run the simulated provider on this port."),
    state_dir: Path = DirOption,
) -> None:
    """Start a router worker and an endpoint worker (every endpoint) in the background.

    Needs AIMESH_BROKER_URL, AIMESH_RESULT_BACKEND, AIMESH_REDIS_URL and
    AIMESH_DATABASE_URL set to real servers, and `aimesh db upgrade` run once.
    """
    from aimesh_tasks.settings import get_settings

    if get_settings().embedded:
        fail("a cluster needs a real broker: set AIMESH_BROKER_URL (and AIMESH_RESULT_BACKEND, "
             "AIMESH_REDIS_URL, AIMESH_DATABASE_URL); with none set, commands run embedded")
    running = [p for p in _load(state_dir) if alive(p.pid)]
    if running:
        typer.echo(f"the cluster in {state_dir} is up already ({len(running)} processes); "
                   "`aimesh cluster down` stops it")
        return
    check_servers()
    state_dir.mkdir(parents=True, exist_ok=True)
    started = _start(state_dir, router_concurrency, endpoint_concurrency, simulate)
    _save(state_dir, started)
    try:
        wait_ready(started)
    except Exception:
        for process in started:
            stop(process)
        raise
    _show(started, state_dir)
    typer.echo("stop it with `aimesh cluster down`")


def _show(processes: list[Spawned], state_dir: Path) -> None:
    rows = table("role", "pid", "node / port", "state", "log",
                 title=f"local cluster ({state_dir})")
    for p in processes:
        where = p.node or f"127.0.0.1:{p.port}"
        rows.add_row(p.role, str(p.pid), where, "up" if alive(p.pid) else "down",
                     os.path.relpath(p.log))
    stdout().print(rows)


@cli.command("status")
def status(state_dir: Path = DirOption) -> None:
    """The processes `aimesh cluster up` started, and whether each still runs."""
    processes = _load(state_dir)
    if not processes:
        typer.echo(f"no cluster was started from {state_dir}; `aimesh cluster up` starts one")
        return
    _show(processes, state_dir)


@cli.command("down")
def down(state_dir: Path = DirOption) -> None:
    """Stop the processes `aimesh cluster up` started (warm shutdown, then SIGKILL)."""
    processes = _load(state_dir)
    if not processes:
        typer.echo(f"no cluster was started from {state_dir}; nothing to stop")
        return
    for process in processes:
        stop(process)
    (state_dir / STATE_FILE).unlink()
    typer.echo(f"stopped {len(processes)} processes (logs kept in {state_dir})")
