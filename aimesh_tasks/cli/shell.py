"""What every `aimesh` command shares: errors as one line on stderr, consoles, URLs.

An error the user can fix (an AimeshError, an unreachable broker, Redis or database)
becomes `error: ...` on stderr and exit code 2, never a traceback; `aimesh --help` lists
the exit codes.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from decimal import Decimal
from typing import Any, NoReturn

import kombu.exceptions
import redis
import sqlalchemy.exc
import typer
from rich import box
from rich.console import Console
from rich.table import Table
from sqlalchemy.engine import make_url
from typer.core import TyperGroup

from aimesh_tasks.errors import AimeshError
from aimesh_tasks.settings import get_settings

EXIT_FAILED = 1  # the command ran, but some messages failed or were rejected
EXIT_ERROR = 2  # the command could not run: bad input, unknown id, a server unreachable
CHECK_TIMEOUT_S = 3.0
PIPED_WIDTH = 160
# Publishing retries briefly, so a broker that goes away fails the CLI in seconds.
SHORT_PUBLISH_RETRY = {"max_retries": 2, "interval_start": 0, "interval_step": 0.5,
                       "interval_max": 1}


def stdout() -> Console:
    """A console on stdout (created per call: CliRunner swaps sys.stdout). Piped into a
    file or another program, tables get room instead of the 80 columns rich assumes."""
    console = Console()
    if not console.is_terminal:
        console = Console(width=PIPED_WIDTH)
    return console


def table(*headers: str, title: str | None = None) -> Table:
    """A compact table; the first column (an id) is never cut short."""
    table = Table(title=title, box=box.SIMPLE_HEAD, pad_edge=False)
    for n, header in enumerate(headers):
        # Figures are folded onto a second line rather than cut with an ellipsis.
        table.add_column(header, no_wrap=n == 0, overflow="fold",
                         justify="left" if n == 0 else "right")
    return table


def usd(amount: str, places: int = 6) -> str:
    """A decimal USD string rounded for a table (reports in JSON keep every digit)."""
    return f"{Decimal(amount):.{places}f}"


def stderr() -> Console:
    """A console on stderr, for progress bars and notes that must not mix with data."""
    return Console(stderr=True)


def fail(message: str) -> NoReturn:
    """Print `error: message` on stderr and exit with EXIT_ERROR."""
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(EXIT_ERROR)


def safe_url(url: str) -> str:
    """The URL with any password masked."""
    from kombu.utils.url import maybe_sanitize_url

    return str(maybe_sanitize_url(url))


def _safe_db_url(url: str) -> str:
    try:
        return make_url(url).render_as_string(hide_password=True)
    except sqlalchemy.exc.ArgumentError:
        return url


def _first_line(exc: BaseException) -> str:
    text = str(getattr(exc, "orig", None) or exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def database_error(exc: sqlalchemy.exc.DBAPIError) -> str:
    """One line on a database error: not migrated, or not reachable."""
    url = _safe_db_url(get_settings().database_url)
    reason = _first_line(exc)
    if "no such table" in reason or "does not exist" in reason:
        return (f"the database at {url} is not migrated ({reason}); run `aimesh db upgrade`")
    return (f"cannot reach the database at {url} ({reason}); start it, or point "
            "AIMESH_DATABASE_URL at a running one")


def _describe(exc: Exception) -> str | None:
    settings = get_settings()
    if isinstance(exc, AimeshError):
        return exc.message
    if isinstance(exc, kombu.exceptions.OperationalError):
        return (f"cannot reach the broker at {safe_url(settings.broker_url)} "
                f"({_first_line(exc)}); start it, or set AIMESH_BROKER_URL")
    if isinstance(exc, redis.ConnectionError | redis.TimeoutError):
        return (f"cannot reach Redis ({_first_line(exc)}); check AIMESH_REDIS_URL="
                f"{safe_url(settings.redis_url)} and AIMESH_RESULT_BACKEND="
                f"{safe_url(settings.result_backend)}")
    if isinstance(exc, sqlalchemy.exc.DBAPIError):
        return database_error(exc)
    return None


class AimeshGroup(TyperGroup):
    """The root command group: maps the errors a user can fix to one line and exit 2."""

    def invoke(self, ctx: Any) -> Any:
        """Run the command; a known error becomes `error: ...` on stderr."""
        try:
            return super().invoke(ctx)
        except Exception as exc:
            described = _describe(exc)
            if described is None:
                raise
            fail(described)


def check_servers(timeout_s: float = CHECK_TIMEOUT_S) -> None:
    """Fail fast, naming the URL, when the broker or a Redis result backend is down."""
    settings = get_settings()
    if settings.embedded:
        return
    from aimesh_tasks.app import app

    with app.connection_for_write() as connection:
        connection.ensure_connection(max_retries=1, interval_start=0, interval_step=0.5,
                                     timeout=timeout_s)
    backend = settings.result_backend
    if backend.startswith(("redis://", "rediss://")):
        client = redis.Redis.from_url(backend, socket_connect_timeout=timeout_s,
                                      socket_timeout=timeout_s)
        try:
            client.ping()
        except redis.RedisError as exc:
            fail(f"cannot reach the result backend at {safe_url(backend)} ({_first_line(exc)}); "
                 "start it, or set AIMESH_RESULT_BACKEND")
        finally:
            client.close()


def quiet_embedded_logs() -> None:
    """In embedded mode the worker runs in this process, and its per-message decision logs
    would bury the command's output: default them to WARNING unless AIMESH_LOG_LEVEL is
    set. Call before the embedded worker starts."""
    from aimesh_tasks.settings import reset_settings

    if "AIMESH_LOG_LEVEL" not in os.environ:
        os.environ["AIMESH_LOG_LEVEL"] = "WARNING"
        reset_settings()


@contextmanager
def short_publish_retries() -> Iterator[None]:
    """While inside, publishing gives up after about a second instead of retrying long."""
    from aimesh_tasks.app import app

    before = app.conf.task_publish_retry_policy
    app.conf.task_publish_retry_policy = SHORT_PUBLISH_RETRY
    try:
        yield
    finally:
        app.conf.task_publish_retry_policy = before
