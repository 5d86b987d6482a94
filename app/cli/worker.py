"""`stella worker` and `stella beat`: the Celery processes."""

from __future__ import annotations

from typing import Annotated

import typer

from app.logs.jobs import install as install_job_logging
from app.settings import get_settings


def worker(
    concurrency: Annotated[int, typer.Option(min=1, help="Job processes.")] = 2,
    loglevel: Annotated[str, typer.Option(help="Celery log level.")] = "INFO",
    hostname: Annotated[str | None, typer.Option(help="Node name (default: stella@host).")] = None,
) -> None:
    """Run a Celery worker: fan-out, renewals and sweeps."""
    # The Celery app reads settings when built: only when this command runs.
    from workers.celery_app import celery_app  # noqa: PLC0415

    log_format = get_settings().log_format
    install_job_logging(service="worker", log_format=log_format, level=loglevel)
    argv = [
        *_banner(log_format),
        "worker",
        f"--concurrency={concurrency}",
        f"--loglevel={loglevel}",
        "--events",
    ]
    argv.append(f"--hostname={hostname or 'stella@%h'}")
    celery_app.worker_main(argv)


def beat(
    loglevel: Annotated[str, typer.Option(help="Celery log level.")] = "INFO",
) -> None:
    """Run Celery beat: it schedules the sweeps (run exactly one; a second does no harm)."""
    from workers.celery_app import celery_app  # noqa: PLC0415

    settings = get_settings()
    install_job_logging(service="beat", log_format=settings.log_format, level=loglevel)
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    schedule = settings.data_dir / "celerybeat-schedule"
    celery_app.start(
        [*_banner(settings.log_format), "beat", f"--loglevel={loglevel}", f"--schedule={schedule}"]
    )


def _banner(log_format: str) -> list[str]:
    # Celery prints its start-up banner outside logging: no place in JSON lines.
    return ["--quiet"] if log_format == "json" else []
