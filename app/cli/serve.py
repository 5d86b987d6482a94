"""`stella serve`: the web process (uvicorn), optionally with mutual TLS."""

from __future__ import annotations

from typing import Annotated

import typer
import uvicorn

from app.metrics import multiprocess as metrics_multiprocess
from app.server.options import log_config, websocket_options
from app.server.supervisor import MetricsAwareMultiprocess
from app.server.tls import uvicorn_config
from app.settings import get_settings
from pki import PkiError, load_or_create_pki

# Seconds a web worker may take to answer its supervisor's ping. A spawned worker
# answers only once it has imported the app again (about 4 s on an idle small machine,
# far more under load); uvicorn's 5 s default had workers killed and restarted in a loop
# while they started.
WORKER_HEALTHCHECK_TIMEOUT = 60


def serve(
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 8000,
    tls: Annotated[
        bool, typer.Option("--tls", help="Serve HTTPS and ask agents for client certificates.")
    ] = False,
    workers: Annotated[int, typer.Option(min=1, help="Web processes.")] = 1,
    log_level: Annotated[str, typer.Option(help="Log level (uvicorn and the service).")] = "info",
) -> None:
    """Run the web process."""
    settings = get_settings()
    try:
        ca = load_or_create_pki(settings.resolved_pki_dir)
    except PkiError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from exc
    # Before any web process imports prometheus-client (the app factory below does).
    metrics_multiprocess.prepare(settings, port)
    server_cert = server_key = None
    if tls:
        server_cert, server_key = ca.server_certificate_files(settings.server_names)
    config = uvicorn_config(
        "app.main:create_app",
        factory=True,
        host=host,
        port=port,
        tls=tls,
        ca_cert_file=ca.files.ca_cert,
        server_cert_file=server_cert,
        server_key_file=server_key,
        workers=workers,
        log_level=log_level,
        log_config=log_config(log_level, settings.log_format),
        timeout_keep_alive=settings.keep_alive_timeout,
        timeout_worker_healthcheck=WORKER_HEALTHCHECK_TIMEOUT,
        **websocket_options(settings),
    )
    if workers == 1:
        uvicorn.Server(config).run()
    else:
        MetricsAwareMultiprocess(config, sockets=[config.bind_socket()]).run()
