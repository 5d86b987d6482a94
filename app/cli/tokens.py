"""`stella tokens create`: mint a registration token.

With a server (`--server` or `STELLA_SERVER_URL`) it goes through the operator API;
without one it is minted straight in the database the `STELLA_` settings name, as
`stella dev` users on the same machine need.
"""

from __future__ import annotations

import json
from typing import Annotated, Any

import typer

from app.cli.options import (
    AdminTokenFileOpt,
    AdminTokenOpt,
    CaOpt,
    JsonOpt,
    ServerOpt,
    operator_api,
)

cli = typer.Typer(help="Registration tokens.", no_args_is_help=True)


def _in_database(ttl: int | None) -> dict[str, Any]:
    # Imported here: the API path needs none of the server's code.
    from app.db import transaction  # noqa: PLC0415
    from app.errors import StellaError  # noqa: PLC0415
    from app.runtime import build_runtime  # noqa: PLC0415
    from app.settings import get_settings  # noqa: PLC0415
    from app.tokens import service  # noqa: PLC0415

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
    return {"token": token, "expiresAt": row.expires_at.isoformat()}


@cli.command("create")
def create(
    ttl: Annotated[
        int | None, typer.Option(help="Lifetime in seconds (default and maximum: 24 h).")
    ] = None,
    server: ServerOpt = None,
    ca: CaOpt = None,
    admin_token: AdminTokenOpt = None,
    admin_token_file: AdminTokenFileOpt = None,
    json_output: JsonOpt = False,
) -> None:
    """Mint a single-use registration token and print it (it is shown only once).

    Through the operator API when a server is given, else straight in the local database.
    """
    if server:
        with operator_api(server, ca, admin_token, admin_token_file) as api:
            minted = api.post(
                "/api/v1/registration-tokens", json={} if ttl is None else {"ttlSeconds": ttl}
            )
    else:
        minted = _in_database(ttl)
    if json_output:
        typer.echo(json.dumps(minted, indent=2))
        return
    typer.echo(minted["token"])
    typer.echo(f"expires at {minted['expiresAt']}", err=True)
