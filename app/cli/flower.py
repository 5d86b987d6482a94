"""`stella flower`: Flower, watching the workers on the same broker."""

from __future__ import annotations

from typing import Annotated

import typer


def flower(
    port: Annotated[int, typer.Option(help="Port of the Flower web UI.")] = 5555,
    address: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    extra: Annotated[
        list[str] | None, typer.Argument(help="More Flower options, e.g. --basic-auth=user:pw.")
    ] = None,
) -> None:
    """Run Flower (ops monitoring of workers and jobs); events are on in every worker."""
    from workers.celery_app import celery_app  # noqa: PLC0415

    celery_app.start(["flower", f"--port={port}", f"--address={address}", *(extra or [])])
