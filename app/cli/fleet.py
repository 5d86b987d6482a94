"""`stella fleet guard|forecast`: the fleet's risks, over the operator API.

- `guard`: whether the mass-offline guard holds the offline sweep now, and why.
- `forecast`: the agents whose certificates will lapse with no renewal in sight.
"""

from __future__ import annotations

from typing import Annotated

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

cli = typer.Typer(help="The fleet's risks (over the operator API).", no_args_is_help=True)


@cli.command("guard")
def guard(
    server: ServerOpt = None,
    ca: CaOpt = None,
    admin_token: AdminTokenOpt = None,
    admin_token_file: AdminTokenFileOpt = None,
    json_output: JsonOpt = False,
) -> None:
    """Is the mass-offline guard engaged (no agent marked offline), since when, until when?"""
    with operator_api(server, ca, admin_token, admin_token_file) as api:
        state = api.get("/api/v1/sweeps/guard")
    render.answer(state, render.guard_detail(state), json_output=json_output)


@cli.command("forecast")
def forecast(
    hours: Annotated[
        int, typer.Option(min=1, max=8784, help="The horizon: certificates expiring within it.")
    ] = 24,
    limit: Annotated[int, typer.Option(min=1, max=1000, help="At-risk agents listed.")] = 100,
    server: ServerOpt = None,
    ca: CaOpt = None,
    admin_token: AdminTokenOpt = None,
    admin_token_file: AdminTokenFileOpt = None,
    json_output: JsonOpt = False,
) -> None:
    """Agents whose certificates expire within HOURS with no renewal in sight."""
    with operator_api(server, ca, admin_token, admin_token_file) as api:
        answer = api.get("/api/v1/certificates/forecast", {"hours": hours, "limit": limit})
    render.answer(answer, render.forecast_view(answer), json_output=json_output)
