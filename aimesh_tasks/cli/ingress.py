"""`aimesh ingress`: serve the OpenAI-compatible HTTP ingress with uvicorn.

The same as `uvicorn aimesh_tasks.ingress.app:app --host H --port P --workers N
--timeout-keep-alive 75`; with
several workers the ingress's request metrics are summed across them through a
PROMETHEUS_MULTIPROC_DIR made for this run (unless one is set already).
"""

from __future__ import annotations

import os
import tempfile

import typer

APP = "aimesh_tasks.ingress.app:app"
# uvicorn closes an idle connection after 5 s by default, the same 5 s after which httpx (and so
# the openai SDK) stops reusing one: a request sent on a connection at that moment meets a
# closed socket (httpx.ReadError, seen at c=100 in bench_ingress). A server keeps idle
# connections longer than its clients do; 75 s is also past common load balancers' 60 s.
KEEP_ALIVE_S = 75


def ingress(
    host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on."),
    port: int = typer.Option(8080, "--port", min=0, max=65535, help="Port to listen on."),
    workers: int = typer.Option(1, "--workers", min=1, max=64,
                                help="Server processes (each its own event loop)."),
    log_level: str = typer.Option("warning", "--log-level", help="uvicorn's log level."),
    keep_alive_s: int = typer.Option(KEEP_ALIVE_S, "--keep-alive", min=1, max=3600,
                                     help="Seconds an idle client connection is kept open."),
) -> None:
    """Serve POST /v1/chat/completions and the other ingress routes (see /openapi.json)."""
    import uvicorn

    from aimesh_tasks.settings import get_settings

    get_settings()  # a bad AIMESH_* value fails here, naming the variable
    if workers > 1 and not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="aimesh-ingress-")
    typer.echo(f"aimesh ingress: serving http://{host}:{port} ({workers} process"
               f"{'es' if workers > 1 else ''})", err=True)
    uvicorn.run(APP, host=host, port=port, workers=workers, log_level=log_level,
                proxy_headers=False, server_header=False, timeout_keep_alive=keep_alive_s)
