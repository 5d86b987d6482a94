"""`stella db upgrade`: apply the schema migrations."""

from __future__ import annotations

import typer

from app import migrate
from app.db import make_engine
from app.settings import get_settings

cli = typer.Typer(help="The database schema.", no_args_is_help=True)


@cli.command("upgrade")
def upgrade(revision: str = typer.Argument("head", help="Target revision.")) -> None:
    """Apply every pending migration (safe to run again)."""
    settings = get_settings()
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    engine = make_engine(settings.resolved_database_url)
    try:
        migrate.upgrade(engine, revision)
    finally:
        engine.dispose()
    typer.echo(f"database at {revision}: {engine.url.render_as_string(hide_password=True)}")
