"""What every `aimesh` command shares: errors as one line on stderr, consoles, URLs.

An error the user can fix (an AimeshError, an invalid AIMESH_* setting, an unreachable
broker, Redis or database) becomes `error: ...` on stderr and exit code 2, never a
traceback; `aimesh --help` lists the exit codes. Importing this module is cheap (typer
only): rich, kombu, redis and SQLAlchemy are imported by the functions that use them, so
that `aimesh --help` starts fast.
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from decimal import Decimal
from typing import TYPE_CHECKING, Any, NoReturn

import typer
from typer.core import TyperGroup

from aimesh_tasks.errors import AimeshError, ServiceUnavailable

if TYPE_CHECKING:
    from rich.console import Console
    from rich.table import Table

    from aimesh_tasks.settings import Settings



def get_settings() -> Settings:
    """The process-wide settings (imported here on first use: pydantic is not cheap)."""
    from aimesh_tasks.settings import get_settings as read

    return read()


EXIT_FAILED = 1  # the command ran, but some messages failed or were rejected
EXIT_ERROR = 2  # the command could not run: bad input, unknown id, a server unreachable
CHECK_TIMEOUT_S = 3.0
# Piped output gets one line per table row however many columns a table has (a script greps
# a row).
PIPED_WIDTH = 400
# Publishing retries briefly, so a broker that goes away fails the CLI in seconds.
SHORT_PUBLISH_RETRY = {"max_retries": 2, "interval_start": 0, "interval_step": 0.5,
                       "interval_max": 1}


def stdout() -> Console:
    """A console on stdout (created per call: CliRunner swaps sys.stdout). Piped into a
    file or another program, tables get room instead of the 80 columns rich assumes."""
    from rich.console import Console

    console = Console()
    if not console.is_terminal:
        console = Console(width=PIPED_WIDTH)
    return console


def table(*headers: str, title: str | None = None) -> Table:
    """A compact table; the first column (an id) is never cut short."""
    from rich import box
    from rich.table import Table

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
    from rich.console import Console

    return Console(stderr=True)


def fail(message: str) -> NoReturn:
    """Print `error: message` on stderr and exit with EXIT_ERROR."""
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(EXIT_ERROR)


def safe_url(url: str) -> str:
    """The URL with any password masked."""
    from kombu.utils.url import maybe_sanitize_url

    return str(maybe_sanitize_url(url))


def safe_db_url(url: str) -> str:
    """The database URL with its password masked."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        return make_url(url).render_as_string(hide_password=True)
    except ArgumentError:
        return url


def _first_line(exc: BaseException) -> str:
    text = str(getattr(exc, "orig", None) or exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


_MISSING_DATABASE = re.compile(r'database "([^"]+)" does not exist')


def database_error(exc: BaseException) -> str:
    """One line on a database error: missing, not migrated, or not reachable."""
    url = safe_db_url(get_settings().database_url)
    reason = _first_line(exc)
    missing = _MISSING_DATABASE.search(str(getattr(exc, "orig", None) or exc))
    if missing:
        return (f"the database '{missing.group(1)}' does not exist on the server of {url}; "
                "`aimesh db upgrade` creates it (when the server lets this user create "
                "databases) and its tables")
    if "no such table" in reason or "does not exist" in reason:
        return f"the database at {url} is not migrated ({reason}); run `aimesh db upgrade`"
    return (f"cannot reach the database at {url} ({reason}); start it, or point "
            "AIMESH_DATABASE_URL at a running one")


def _loaded(module: str) -> Any:
    # An exception of a library this process never imported cannot be raised: looking the
    # module up instead of importing it keeps `aimesh --help` from loading it.
    return sys.modules.get(module)


def _server_error(exc: Exception) -> str | None:
    settings = get_settings()
    kombu_exc, redis_mod, sa_exc = (_loaded("kombu.exceptions"), _loaded("redis"),
                                    _loaded("sqlalchemy.exc"))
    if kombu_exc is not None and isinstance(exc, kombu_exc.OperationalError):
        return (f"cannot reach the broker at {safe_url(settings.broker_url)} "
                f"({_first_line(exc)}); start it, or set AIMESH_BROKER_URL")
    if redis_mod is not None and isinstance(exc, redis_mod.ConnectionError
                                            | redis_mod.TimeoutError):
        return (f"cannot reach Redis ({_first_line(exc)}); check AIMESH_REDIS_URL="
                f"{safe_url(settings.redis_url)} and AIMESH_RESULT_BACKEND="
                f"{safe_url(settings.result_backend)}")
    if sa_exc is not None and isinstance(exc, sa_exc.DBAPIError):
        return database_error(exc)
    return None


# Library fields and functions an error may name, as the CLI user knows them.
CLI_NAMES = {
    "input_usd_per_1k": "--input-price",
    "output_usd_per_1k": "--output-price",
    "base_url": "--url",
    "api_key_env": "--api-key-env",
    "api_key_file": "--api-key-file",
    "rolling_s": "--rolling-s",
    "expires_at": "--expires",
    "update_endpoint": "`aimesh endpoints update`",
    "add_endpoint": "`aimesh endpoints add`",
    "set_budget": "`aimesh budgets set`",
}
_CLI_NAME = re.compile(r"\b(" + "|".join(CLI_NAMES) + r")\b")


def in_cli_terms(message: str) -> str:
    """The message with library field and function names replaced by the CLI's flags and
    commands (`input_usd_per_1k` -> `--input-price`)."""
    return _CLI_NAME.sub(lambda m: CLI_NAMES[m.group(1)], message)


def describe(exc: Exception) -> str | None:
    """The one line a user sees for an error they can fix, or None for a bug."""
    if isinstance(exc, AimeshError):
        # A server that is away (submit's ServiceUnavailable from a refused publish) is
        # said with the setting that points at it.
        cause = exc.__cause__
        server = (_server_error(cause) if isinstance(exc, ServiceUnavailable)
                  and isinstance(cause, Exception) else None)
        return server or in_cli_terms(exc.message)
    return _server_error(exc)


def _asks_for_help(ctx: Any) -> bool:
    # typer's own copy of click keeps the subcommand's name in `_protected_args`.
    protected = getattr(ctx, "_protected_args", None) or getattr(ctx, "protected_args", [])
    return "--help" in [*protected, *ctx.args]


class AimeshGroup(TyperGroup):
    """The root command group: reads the settings before any command runs, and maps the
    errors a user can fix to one line and exit 2."""

    def invoke(self, ctx: Any) -> Any:
        """Run the command; a known error becomes `error: ...` on stderr."""
        try:
            if not _asks_for_help(ctx):
                get_settings()  # an invalid AIMESH_* value stops every command here
            return super().invoke(ctx)
        except Exception as exc:
            described = describe(exc)
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
        import redis

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
