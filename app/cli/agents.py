"""`stella agents list|show|delete`: the fleet, over the operator API."""

from __future__ import annotations

from typing import Annotated, Any

import typer

from app.cli import render
from app.cli.options import (
    EXIT_API_ERROR,
    AdminTokenFileOpt,
    AdminTokenOpt,
    CaOpt,
    JsonOpt,
    ServerOpt,
    operator_api,
)

cli = typer.Typer(help="Agents: list, show, delete (over the operator API).", no_args_is_help=True)


@cli.command("list")
def list_agents(
    status: Annotated[
        str | None, typer.Option(help="online, offline or degraded.", show_default=False)
    ] = None,
    capability: Annotated[
        str | None, typer.Option(help="Only agents with this capability.", show_default=False)
    ] = None,
    label: Annotated[
        list[str] | None, typer.Option(help="key=value; repeat to require several.")
    ] = None,
    limit: Annotated[
        int | None,
        typer.Option(min=1, max=1000, help="Agents per page (server default: 100)."),
    ] = None,
    all_pages: Annotated[
        bool, typer.Option("--all", help="Follow the next pages to the end of the list.")
    ] = False,
    server: ServerOpt = None,
    ca: CaOpt = None,
    admin_token: AdminTokenOpt = None,
    admin_token_file: AdminTokenFileOpt = None,
    json_output: JsonOpt = False,
) -> None:
    """List agents, sorted by name."""
    params: dict[str, Any] = {"status": status, "capability": capability, "label": label or []}
    if limit is not None:
        params["limit"] = limit
    params = {key: value for key, value in params.items() if value not in (None, [])}
    with operator_api(server, ca, admin_token, admin_token_file) as api:
        agents, more = api.fetch_list("/api/v1/agents", params, all_pages=all_pages)
    render.answer(agents, render.agents_table(agents), json_output=json_output)
    if more:
        render.console(stderr=True).print("more agents follow: add --all to list them all")


@cli.command("show")
def show(
    agent_id: Annotated[str, typer.Argument(metavar="ID", help="The agent's id.")],
    server: ServerOpt = None,
    ca: CaOpt = None,
    admin_token: AdminTokenOpt = None,
    admin_token_file: AdminTokenFileOpt = None,
    json_output: JsonOpt = False,
) -> None:
    """Show one agent in full."""
    with operator_api(server, ca, admin_token, admin_token_file) as api:
        agent = api.get(f"/api/v1/agents/{agent_id}")
    render.answer(agent, render.agent_detail(agent), json_output=json_output)


@cli.command("delete")
def delete(
    agent_id: Annotated[str, typer.Argument(metavar="ID", help="The agent's id.")],
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask for confirmation.")] = False,
    server: ServerOpt = None,
    ca: CaOpt = None,
    admin_token: AdminTokenOpt = None,
    admin_token_file: AdminTokenFileOpt = None,
    json_output: JsonOpt = False,
) -> None:
    """Delete an agent: its credentials stop working and its unfinished tasks are cancelled."""
    with operator_api(server, ca, admin_token, admin_token_file) as api:
        if not yes:
            agent = api.get(f"/api/v1/agents/{agent_id}")
            question = (
                f"Delete agent {render.clean(agent['name'])} ({render.clean(agent['id'])}) "
                f"and cancel its {agent.get('openTasks', 0)} open task(s)?"
            )
            # The question goes to stderr, so that stdout stays one document under --json.
            if not typer.confirm(question, err=True):
                render.error("not deleted")
                raise typer.Exit(EXIT_API_ERROR)
        answer = api.delete(f"/api/v1/agents/{agent_id}")
    render.answer(answer, f"agent {render.clean(agent_id)} deleted", json_output=json_output)
