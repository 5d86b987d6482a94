"""`stella keys`: the server's task-signing keys, in the PKI directory.

Run on the server's machine (it reads the `STELLA_` settings for the PKI
directory); running web processes and workers pick the change up by
themselves, without a restart.
"""

from __future__ import annotations

import datetime as dt
from typing import Annotated

import typer

cli = typer.Typer(help="The server's task-signing keys.", no_args_is_help=True)


@cli.command("rotate-task-signing")
def rotate(
    retire_after: Annotated[
        int | None,
        typer.Option(
            min=0,
            help="Seconds the replaced keys stay published after the switch "
            "(default: STELLA_TASK_SIGNING_RETIRE_AFTER, 7 days).",
            show_default=False,
        ),
    ] = None,
    activate_after: Annotated[
        int,
        typer.Option(min=0, help="Seconds before the new key signs (it is published at once)."),
    ] = 0,
) -> None:
    """Add a new task-signing key; the old ones stay published for a while."""
    # Imported here: `stella keys --help` needs none of it.
    from app.settings import get_settings  # noqa: PLC0415
    from pki import PkiError  # noqa: PLC0415
    from pki.task_signing import (  # noqa: PLC0415
        load_or_create_task_signing,
        rotate_task_signing,
    )

    settings = get_settings()
    directory = settings.resolved_pki_dir
    keep = settings.task_signing_retire_after if retire_after is None else retire_after
    try:
        load_or_create_task_signing(directory)  # refuses a directory that lost its keys
        new = rotate_task_signing(
            directory,
            retire_after=dt.timedelta(seconds=keep),
            activate_after=dt.timedelta(seconds=activate_after),
        )
    except PkiError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from exc
    typer.echo(f"new task-signing key {new.kid}, signing from {new.activates_at.isoformat()}")
    typer.echo(f"the keys it replaces stay published for {keep} s after that")


@cli.command("list")
def list_keys() -> None:
    """The task-signing keys agents are told about now (kid, state, dates)."""
    from app.settings import get_settings  # noqa: PLC0415
    from pki import PkiError  # noqa: PLC0415
    from pki.task_signing import load_or_create_task_signing  # noqa: PLC0415

    try:
        keyring = load_or_create_task_signing(get_settings().resolved_pki_dir)
    except PkiError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from exc
    signing = keyring.signing_key().kid
    for key in keyring.published():
        state = "signing" if key["kid"] == signing else "published"
        retires = f" retires {key['retiresAt']}" if "retiresAt" in key else ""
        typer.echo(f"{key['kid']}  {state:9}  activates {key['activatesAt']}{retires}")
