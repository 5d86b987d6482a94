"""`stella tokens create`: mint a registration token straight in the database."""

from __future__ import annotations

from typing import Annotated

import typer

from app.db import transaction
from app.errors import StellaError
from app.runtime import build_runtime
from app.settings import get_settings
from app.tokens import service

cli = typer.Typer(help="Registration tokens.", no_args_is_help=True)


@cli.command("create")
def create(
    ttl: Annotated[
        int | None, typer.Option(help="Lifetime in seconds (default and maximum: 24 h).")
    ] = None,
) -> None:
    """Mint a single-use registration token and print it (it is shown only once)."""
    runtime = build_runtime(get_settings())
    try:
        with transaction(runtime.engine) as session:
            token, row = service.create_token(
                session=session, settings=runtime.settings, ttl_seconds=ttl
            )
    except StellaError as exc:
        typer.echo(f"error: {exc.detail}", err=True)
        raise typer.Exit(2) from exc
    finally:
        runtime.close()
    typer.echo(token)
    typer.echo(f"expires at {row.expires_at.isoformat()}", err=True)
