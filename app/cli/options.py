"""What every operator command takes to reach the API, and how its failures end the command.

Exit codes: 1 the server answered an error (problem+json), 2 no answer (connection, TLS)
or a usage error, 3 a followed task did not succeed.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated

import typer

from app.cli import render
from app.cli.client import ApiError, Connection, ConnectionFailed, OperatorClient

EXIT_API_ERROR = 1
EXIT_UNREACHABLE = 2
EXIT_TASK_FAILED = 3

ServerOpt = Annotated[
    str | None,
    typer.Option(
        "--server",
        envvar="STELLA_SERVER_URL",
        help="The server's base URL, e.g. https://host:8443.",
        show_default=False,
    ),
]
CaOpt = Annotated[
    Path | None,
    typer.Option(
        "--ca",
        envvar="STELLA_CA_FILE",
        exists=True,
        dir_okay=False,
        help="The CA file that verifies the server (default: the system's).",
        show_default=False,
    ),
]
AdminTokenOpt = Annotated[
    str | None,
    typer.Option(
        "--admin-token",
        help="The admin token. Visible to other users in process listings: prefer "
        "STELLA_ADMIN_TOKEN or --admin-token-file.",
        show_default=False,
    ),
]
AdminTokenFileOpt = Annotated[
    Path | None,
    typer.Option(
        "--admin-token-file",
        envvar="STELLA_ADMIN_TOKEN_FILE",
        exists=True,
        dir_okay=False,
        help="A file holding the admin token.",
        show_default=False,
    ),
]
JsonOpt = Annotated[
    bool, typer.Option("--json", help="Print the API's JSON answer (one document), for scripts.")
]


def _token_from(admin_token: str | None, admin_token_file: Path | None) -> str:
    # Flags before the environment; the file option's envvar is read by typer.
    if admin_token:
        return admin_token.strip()
    if admin_token_file is not None:
        return admin_token_file.read_text().strip()
    return os.environ.get("STELLA_ADMIN_TOKEN", "").strip()


def connection(
    server: str | None,
    ca: Path | None,
    admin_token: str | None,
    admin_token_file: Path | None,
) -> Connection:
    """The connection the options and environment describe (a usage error when incomplete)."""
    if not server:
        raise typer.BadParameter("give --server or set STELLA_SERVER_URL", param_hint="--server")
    if not server.startswith(("https://", "http://")):
        raise typer.BadParameter("the server URL starts with https://", param_hint="--server")
    token = _token_from(admin_token, admin_token_file)
    if not token:
        raise typer.BadParameter(
            "set STELLA_ADMIN_TOKEN, or give --admin-token-file or --admin-token",
            param_hint="--admin-token",
        )
    # Checked here, never shown: httpx would quote a bad header value in its error.
    if not all(33 <= ord(char) <= 126 for char in token):
        raise typer.BadParameter(
            "the admin token holds characters an HTTP header cannot carry",
            param_hint="--admin-token",
        )
    return Connection(server=server, ca_file=ca, admin_token=token)


@contextmanager
def operator_api(
    server: str | None,
    ca: Path | None,
    admin_token: str | None,
    admin_token_file: Path | None,
) -> Iterator[OperatorClient]:
    """An API client for one command; an error answer or a failed connection ends it."""
    target = connection(server, ca, admin_token, admin_token_file)
    try:
        with OperatorClient(target) as client:
            yield client
    except ApiError as exc:
        render.problem(exc)
        raise typer.Exit(EXIT_API_ERROR) from None
    except ConnectionFailed as exc:
        render.error(str(exc))
        raise typer.Exit(EXIT_UNREACHABLE) from None
