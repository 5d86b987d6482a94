"""`stella simulate`: many simulated agents in one process, over the wire only."""

from __future__ import annotations

import asyncio
import json
import logging
from pathlib import Path
from typing import Annotated

import typer

from agent.labels import parse_labels
from agent.simulate import SimOptions, SimulationError, format_summary, simulate


def simulate_command(
    server: Annotated[str, typer.Option(help="The server's base URL, e.g. https://host:8443.")],
    agents: Annotated[int, typer.Option(min=1, help="How many agents to simulate.")] = 10,
    token_file: Annotated[
        Path | None,
        typer.Option(exists=True, dir_okay=False, help="Registration tokens, one per line."),
    ] = None,
    admin_token: Annotated[
        str | None,
        typer.Option(
            envvar="STELLA_ADMIN_TOKEN",
            help="Mint the registration tokens through the operator API with this token.",
        ),
    ] = None,
    ca: Annotated[
        Path | None,
        typer.Option(exists=True, dir_okay=False, help="The CA file that verifies the server."),
    ] = None,
    name_prefix: Annotated[
        str, typer.Option(help="Agent names are this prefix and an index.")
    ] = "sim-",
    start_index: Annotated[int, typer.Option(min=0, help="The first agent's index.")] = 1,
    capability: Annotated[
        list[str] | None, typer.Option(help="A capability of every agent (repeat).")
    ] = None,
    label: Annotated[list[str] | None, typer.Option(help="A label key=value (repeat).")] = None,
    heartbeat_interval: Annotated[
        float | None,
        typer.Option(min=0.05, help="Seconds between heartbeats (default: the server's)."),
    ] = None,
    stream: Annotated[
        bool, typer.Option("--stream", help="Hold a task stream per agent as well.")
    ] = False,
    task_seconds: Annotated[
        float, typer.Option(min=0, help="Seconds each task 'runs' before it is completed.")
    ] = 0.0,
    report_every: Annotated[
        float, typer.Option(min=0.1, help="Seconds between live summary lines (stderr).")
    ] = 5.0,
    duration: Annotated[
        float | None, typer.Option(min=0, help="Stop after this many seconds (else Ctrl-C).")
    ] = None,
    register_concurrency: Annotated[
        int, typer.Option(min=1, help="Registrations (and token mints) in flight at once.")
    ] = 50,
    shutdown_grace: Annotated[
        float, typer.Option(min=0, help="Seconds received tasks get to complete at the end.")
    ] = 5.0,
    keepalive: Annotated[
        float,
        typer.Option(
            min=0, help="Seconds an idle connection is kept (keep it below the server's)."
        ),
    ] = 4.0,
    json_output: Annotated[
        bool, typer.Option("--json", help="Print the final summary as JSON on stdout.")
    ] = False,
) -> None:
    """Register N agents (own key, certificate and JWT each), heartbeat and answer tasks."""
    logging.getLogger("httpx").setLevel(logging.WARNING)
    try:
        labels = parse_labels(label or [])
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--label") from exc
    if token_file is None and not admin_token:
        raise typer.BadParameter(
            "give --token-file or --admin-token (or STELLA_ADMIN_TOKEN)",
            param_hint="--token-file/--admin-token",
        )
    options = SimOptions(
        server=server.rstrip("/"),
        agents=agents,
        token_file=token_file,
        admin_token=admin_token,
        ca_file=ca,
        name_prefix=name_prefix,
        start_index=start_index,
        capabilities=capability or [],
        labels=labels,
        heartbeat_interval=heartbeat_interval,
        stream=stream,
        task_seconds=task_seconds,
        report_every=report_every,
        duration=duration,
        register_concurrency=register_concurrency,
        shutdown_grace=shutdown_grace,
        keepalive=keepalive,
    )
    try:
        summary = asyncio.run(simulate(options))
    except SimulationError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from exc
    if json_output:
        typer.echo(json.dumps(summary, indent=2))
    else:
        typer.echo(format_summary(summary))
    if summary["registered"] == 0:
        raise typer.Exit(1)
