"""`aimesh db`: database migrations."""

from __future__ import annotations

import typer

from aimesh_tasks.db import migrate

cli = typer.Typer(help="Database migrations (alembic).", no_args_is_help=True)


@cli.command("upgrade")
def upgrade(
    revision: str = typer.Argument("heads", help="Target revision (every head by default)."),
    url: str = typer.Option(None, "--url", help="Database URL (default AIMESH_DATABASE_URL)."),
) -> None:
    """Apply migrations up to REVISION (default: the newest)."""
    migrate.upgrade(url, revision)
    typer.echo(f"database upgraded to {revision}")


@cli.command("downgrade")
def downgrade(
    revision: str = typer.Argument(..., help="Target revision ('base' empties the database)."),
    url: str = typer.Option(None, "--url", help="Database URL (default AIMESH_DATABASE_URL)."),
) -> None:
    """Revert migrations down to REVISION."""
    migrate.downgrade(url, revision)
    typer.echo(f"database downgraded to {revision}")
