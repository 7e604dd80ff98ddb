"""`aimesh db`: create the database when it is missing, and apply migrations."""

from __future__ import annotations

import typer

cli = typer.Typer(help="Database migrations (alembic).", no_args_is_help=True)
# Databases a Postgres user can connect to in order to create another one.
MAINTENANCE_DATABASES = ("postgres", "template1")


def _url(given: str | None) -> str:
    from aimesh_tasks.errors import InvalidInput
    from aimesh_tasks.settings import database_url, get_settings

    if given is None:
        return get_settings().database_url
    try:
        return database_url(given)
    except ValueError as exc:
        raise InvalidInput(f"--url '{given}': {exc}", field="url", errors=[]) from None


def _cannot_create(url: str, name: str, reason: str) -> str:
    from sqlalchemy.engine import make_url

    u = make_url(url)
    flags = " ".join(f for f in (f"-h {u.host}" if u.host else "",
                                 f"-p {u.port}" if u.port else "",
                                 f"-U {u.username}" if u.username else "") if f)
    return (f"the database '{name}' does not exist and could not be created ({reason}); "
            f"create it with `createdb {flags} {name}`".replace("  ", " ")
            + ", then run `aimesh db upgrade` again")


def ensure_database(url: str) -> bool:
    """Create the Postgres database named in `url` if the server lacks it (True if it was
    created); other databases (SQLite makes its file itself) are left alone."""
    from sqlalchemy import create_engine, text
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import DBAPIError

    from aimesh_tasks.errors import ConfigError

    target = make_url(url)
    name = target.database
    if not target.drivername.startswith("postgresql") or not name:
        return False
    last: DBAPIError | None = None
    for maintenance in MAINTENANCE_DATABASES:
        engine = create_engine(target.set(drivername="postgresql+psycopg", database=maintenance),
                               isolation_level="AUTOCOMMIT")
        try:
            with engine.connect() as connection:
                if connection.execute(text("SELECT 1 FROM pg_database WHERE datname = :n"),
                                      {"n": name}).first():
                    return False
                quoted = name.replace('"', '""')
                connection.execute(text(f'CREATE DATABASE "{quoted}"'))
                return True
        except DBAPIError as exc:
            if "permission denied" in str(exc.orig):
                raise ConfigError(_cannot_create(url, name, "permission denied"),
                                  setting="AIMESH_DATABASE_URL") from None
            last = exc
        finally:
            engine.dispose()
    assert last is not None
    raise last  # the server is unreachable: the CLI says so in one line


@cli.command("upgrade")
def upgrade(
    revision: str = typer.Argument("heads", help="Target revision (every head by default)."),
    url: str = typer.Option(None, "--url", help="Database URL (default AIMESH_DATABASE_URL)."),
) -> None:
    """Create the database if it is missing (Postgres, when this user may), then apply
    migrations up to REVISION (default: the newest)."""
    from aimesh_tasks.cli.shell import safe_db_url
    from aimesh_tasks.db import migrate

    target = _url(url)
    if ensure_database(target):
        typer.echo(f"created database {safe_db_url(target)}")
    migrate.upgrade(target, revision)
    typer.echo(f"database upgraded to {revision}")


@cli.command("downgrade")
def downgrade(
    revision: str = typer.Argument(..., help="Target revision ('base' empties the database)."),
    url: str = typer.Option(None, "--url", help="Database URL (default AIMESH_DATABASE_URL)."),
) -> None:
    """Revert migrations down to REVISION."""
    from aimesh_tasks.db import migrate

    migrate.downgrade(_url(url), revision)
    typer.echo(f"database downgraded to {revision}")
