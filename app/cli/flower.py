"""`stella flower`: Flower, watching the workers on the same broker."""

from __future__ import annotations

from typing import Annotated

import typer

from app.logs.setup import configure as configure_logging
from app.settings import get_settings


def flower(
    port: Annotated[int, typer.Option(help="Port of the Flower web UI.")] = 5555,
    address: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    extra: Annotated[
        list[str] | None, typer.Argument(help="More Flower options, e.g. --basic-auth=user:pw.")
    ] = None,
) -> None:
    """Run Flower (ops monitoring of workers and jobs); events are on in every worker."""
    from workers.celery_app import celery_app  # noqa: PLC0415

    # Ours on the root logger: Flower's (tornado's) then adds no handler of its own.
    configure_logging("info", get_settings().log_format, service="flower")
    celery_app.start(["flower", f"--port={port}", f"--address={address}", *(extra or [])])
