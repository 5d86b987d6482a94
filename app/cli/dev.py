"""`stella dev`: web, worker and beat as separate processes, on the embedded defaults.

SQLite and the filesystem broker unless the environment says otherwise:
nothing to install or start first. Ctrl-C stops every child.
"""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Annotated

import typer
from kombu.utils.url import maybe_sanitize_url
from sqlalchemy.engine import make_url

from app.db import make_engine
from app.jobs import broker_url
from app.migrate import upgrade
from app.settings import get_settings


def _stella() -> list[str]:
    return [sys.executable, "-m", "app.cli"]


def _admin_token(data_dir: Path) -> str:
    """The environment's, else the one this data dir keeps, else a new one (saved 0600)."""
    if token := os.environ.get("STELLA_ADMIN_TOKEN"):
        return token
    path = data_dir / "admin-token"
    if path.exists():
        return path.read_text().strip()
    token = secrets.token_urlsafe(32)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as file:
        file.write(token + "\n")
    return token


def dev(
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 8443,
    tls: Annotated[bool, typer.Option("--tls/--no-tls", help="HTTPS with mTLS (default).")] = True,
) -> None:
    """Run web, worker and beat together; print the URLs and the admin token."""
    settings = get_settings()
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    engine = make_engine(settings.resolved_database_url)
    try:
        upgrade(engine)
    finally:
        engine.dispose()
    env = os.environ | {
        "STELLA_ADMIN_TOKEN": _admin_token(settings.data_dir),
        "STELLA_DATA_DIR": str(settings.data_dir),
        # A terminal, not a log collector: text lines unless asked otherwise.
        "STELLA_LOG_FORMAT": os.environ.get("STELLA_LOG_FORMAT", "text"),
    }
    serve = [*_stella(), "serve", "--host", host, "--port", str(port)]
    commands = {
        "web": [*serve, "--tls"] if tls else serve,
        "worker": [*_stella(), "worker", "--concurrency", "1"],
        "beat": [*_stella(), "beat"],
    }
    children = {name: subprocess.Popen(argv, env=env) for name, argv in commands.items()}  # noqa: S603
    scheme = "https" if tls else "http"
    shown_host = "localhost" if host in ("127.0.0.1", "0.0.0.0") else host  # noqa: S104
    typer.echo(
        f"\nstella dev: web {scheme}://{shown_host}:{port}  (docs: /docs)\n"
        f"  admin token: {env['STELLA_ADMIN_TOKEN']}\n"
        f"  CA:          {settings.resolved_pki_dir / 'ca.pem'}\n"
        f"  database:    {make_url(settings.resolved_database_url).render_as_string()}\n"
        f"  broker:      {maybe_sanitize_url(broker_url(settings))}\n"
        "  Ctrl-C stops web, worker and beat.\n"
    )
    _supervise(children)


def _supervise(children: dict[str, subprocess.Popen[bytes]]) -> None:
    stopping = False

    def stop(_signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    failed: str | None = None
    while not stopping and failed is None:
        for name, child in children.items():
            if child.poll() is not None:
                failed = name
        time.sleep(0.2)
    for child in children.values():
        if child.poll() is None:
            child.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + 15
    for child in children.values():
        try:
            child.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()
    if failed is not None:
        typer.echo(f"stella dev: {failed} exited; stopped the others", err=True)
        raise typer.Exit(1)
