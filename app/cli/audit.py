"""`stella audit list`: the audit trail, newest first, over the operator API."""

from __future__ import annotations

from typing import Annotated, Any

import typer

from app.cli import render
from app.cli.options import (
    AdminTokenFileOpt,
    AdminTokenOpt,
    CaOpt,
    JsonOpt,
    ServerOpt,
    operator_api,
)

cli = typer.Typer(help="The audit trail (over the operator API).", no_args_is_help=True)


@cli.command("list")
def list_events(
    action: Annotated[
        str | None,
        typer.Option(help="token.created, agent.deleted, auth.refused, ...", show_default=False),
    ] = None,
    agent: Annotated[
        str | None, typer.Option(help="Only events about this agent id.", show_default=False)
    ] = None,
    since: Annotated[
        str | None, typer.Option(help="RFC 3339; events at or after.", show_default=False)
    ] = None,
    limit: Annotated[
        int | None, typer.Option(min=1, max=1000, help="Events per page (server default: 100).")
    ] = None,
    all_pages: Annotated[
        bool, typer.Option("--all", help="Follow the next pages to the end of the trail.")
    ] = False,
    server: ServerOpt = None,
    ca: CaOpt = None,
    admin_token: AdminTokenOpt = None,
    admin_token_file: AdminTokenFileOpt = None,
    json_output: JsonOpt = False,
) -> None:
    """Who did what, and when."""
    params: dict[str, Any] = {"action": action, "agentId": agent, "since": since, "limit": limit}
    params = {key: value for key, value in params.items() if value is not None}
    with operator_api(server, ca, admin_token, admin_token_file) as api:
        events, more = api.fetch_list("/api/v1/audit", params, all_pages=all_pages)
    render.answer(events, render.audit_table(events), json_output=json_output)
    if more:
        render.console(stderr=True).print("more events follow: add --all to list them all")
