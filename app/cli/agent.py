"""`stella agent run`: the reference agent (the `agent` package; nothing of the server)."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Annotated

import typer

from agent.labels import parse_labels
from agent.runner import Options, run_agent

cli = typer.Typer(help="The reference agent.", no_args_is_help=True)


@cli.command("run")
def run(
    server: Annotated[str, typer.Option(help="The server's base URL, e.g. https://host:8443.")],
    name: Annotated[str, typer.Option(help="This agent's name (used at registration).")],
    token: Annotated[
        str | None,
        typer.Option(
            envvar="STELLA_AGENT_TOKEN",
            help="Single-use registration token; needed only on the first start.",
        ),
    ] = None,
    capability: Annotated[
        list[str] | None, typer.Option(help="A capability (repeat: docker, compose, ...).")
    ] = None,
    label: Annotated[list[str] | None, typer.Option(help="A label key=value (repeat).")] = None,
    state_dir: Annotated[
        Path, typer.Option(help="Where the key, certificate, CA and JWT are kept (mode 0600).")
    ] = Path("agent-state"),
    ca: Annotated[
        Path | None,
        typer.Option(
            exists=True,
            dir_okay=False,
            help="The CA file that verifies the server (pinned in the state dir).",
        ),
    ] = None,
    allow_shell: Annotated[
        bool, typer.Option("--allow-shell", help="Run shell.exec tasks (off by default).")
    ] = False,
    shutdown_grace: Annotated[
        float, typer.Option(help="Seconds running tasks get to finish on SIGTERM.")
    ] = 30.0,
    log_level: Annotated[str, typer.Option(help="debug, info, warning or error.")] = "info",
) -> None:
    """Register once, then heartbeat, take tasks and run them until SIGTERM."""
    logging.basicConfig(
        level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    # One line per request (every heartbeat and poll) is noise at info level.
    logging.getLogger("httpx").setLevel(max(logging.WARNING, logging.getLogger().level))
    try:
        labels = parse_labels(label or [])
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--label") from exc
    options = Options(
        server=server.rstrip("/"),
        state_dir=state_dir,
        name=name,
        token=token,
        capabilities=capability or [],
        labels=labels,
        ca_file=ca,
        allow_shell=allow_shell,
        shutdown_grace=shutdown_grace,
    )
    code = asyncio.run(run_agent(options))
    raise typer.Exit(code)
