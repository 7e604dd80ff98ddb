"""Flower with basic authentication on every page, the API and Flower's own /metrics.

Flower checks credentials only in handlers marked `@authenticated`; its /metrics handler
is not, so a plain `celery flower --basic-auth=...` still serves /metrics to anyone.
`protect_flower_metrics()` swaps that handler for one that requires the same
credentials. /healthcheck stays open (it answers "OK" and nothing else) for probes.
Credentials reach Flower through its FLOWER_BASIC_AUTH variable inside this process,
never on a command line (where `ps` would show them) and never in a log line.
"""

from __future__ import annotations

import os
from typing import Any

from aimesh_tasks.errors import ConfigError
from aimesh_tasks.settings import Settings

FLOWER_ENV = "FLOWER_BASIC_AUTH"


def basic_auth_credentials(settings: Settings) -> str:
    """The 'user:password[,user:password]' list, or ConfigError saying what to set."""
    secret = settings.flower_basic_auth
    value = secret.get_secret_value() if secret is not None else ""
    pairs = [p for p in value.split(",") if p]
    if not pairs or any(":" not in p or not all(p.split(":", 1)) for p in pairs):
        raise ConfigError(
            "AIMESH_FLOWER_BASIC_AUTH must be 'user:password' (several: comma-separated); "
            "aimesh flower never starts without authentication",
            setting="AIMESH_FLOWER_BASIC_AUTH",
        )
    return ",".join(pairs)


def protect_flower_metrics() -> None:
    """Make Flower's /metrics require the same authentication as its other pages."""
    import tornado.web
    from flower import urls  # type: ignore[import-untyped]
    from flower.views import monitor  # type: ignore[import-untyped]

    class AuthenticatedMetrics(monitor.Metrics):  # type: ignore[misc]
        @tornado.web.authenticated
        async def get(self) -> None:
            await super().get()

    for index, handler in enumerate(urls.handlers):
        if isinstance(handler, tuple) and handler[:2] == (r"/metrics", monitor.Metrics):
            urls.handlers[index] = (r"/metrics", AuthenticatedMetrics)


def flower_argv(port: int, address: str) -> list[str]:
    """The `celery flower` arguments (credentials are not among them)."""
    return ["flower", f"--port={port}", f"--address={address}"]


def prepare_flower(settings: Settings) -> dict[str, Any]:
    """Check credentials, hand them to Flower via its variable, protect /metrics."""
    os.environ[FLOWER_ENV] = basic_auth_credentials(settings)
    os.environ.pop("FLOWER_UNAUTHENTICATED_API", None)
    protect_flower_metrics()
    return {"users": len(os.environ[FLOWER_ENV].split(","))}
