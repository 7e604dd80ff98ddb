"""`aimesh flower`: the Flower web console, always behind basic authentication."""

from __future__ import annotations

import typer

from aimesh_tasks.settings import get_settings


def flower(
    port: int = typer.Option(5555, "--port", help="Port to listen on (0 = any free port)."),
    address: str = typer.Option("127.0.0.1", "--address", help="Address to listen on."),
) -> None:
    """Run Flower with the credentials in AIMESH_FLOWER_BASIC_AUTH ('user:password').

    UI, API and /metrics answer 401 without them.
    Example: `AIMESH_FLOWER_BASIC_AUTH=admin:s3cret aimesh flower --port 5555`.
    """
    from aimesh_tasks.app import app
    from aimesh_tasks.observability.flower_auth import flower_argv, prepare_flower

    prepare_flower(get_settings())
    app.start(flower_argv(port, address))
