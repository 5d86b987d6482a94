"""`stella`: the entry point that gathers the command groups."""

from __future__ import annotations

import typer

from app.cli import (
    agent,
    agents,
    audit,
    db,
    dev,
    fleet,
    flower,
    keys,
    receipts,
    serve,
    simulate,
    tasks,
    tokens,
    worker,
)

cli = typer.Typer(
    name="stella",
    help="Stella agent dispatch: the agent control plane.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
cli.command("serve")(serve.serve)
cli.command("worker")(worker.worker)
cli.command("beat")(worker.beat)
cli.command("flower")(flower.flower)
cli.command("dev")(dev.dev)
cli.command("simulate")(simulate.simulate_command)
cli.add_typer(tokens.cli, name="tokens")
cli.add_typer(db.cli, name="db")
cli.add_typer(agent.cli, name="agent")
cli.add_typer(agents.cli, name="agents")
cli.add_typer(tasks.cli, name="tasks")
cli.add_typer(audit.cli, name="audit")
cli.add_typer(keys.cli, name="keys")
cli.add_typer(receipts.cli, name="receipts")
cli.add_typer(fleet.cli, name="fleet")


def main() -> None:
    cli()
