"""`aimesh metrics`: the cluster exporter (queue depths, live endpoint figures)."""

from __future__ import annotations

import signal
import threading

import typer


def metrics(
    port: int = typer.Option(9808, "--port", help="Port to listen on (0 = any free port)."),
    address: str = typer.Option("127.0.0.1", "--address", help="Address to listen on."),
) -> None:
    """Serve Prometheus metrics read from the broker, Redis and the registry per scrape."""
    from aimesh_tasks.observability.exporter import serve
    from aimesh_tasks.observability.logging import configure_logging

    configure_logging()
    bound = serve(port, address)
    typer.echo(f"aimesh metrics: serving http://{address}:{bound}/metrics", err=True)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        stop.wait()
    except KeyboardInterrupt:
        pass
