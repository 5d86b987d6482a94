"""The request id across the broker, and Celery's logging replaced by ours.

The web process puts the id of the request that enqueued a job in a message
header (`app.jobs.CeleryJobQueue`); the worker binds it before the job runs,
so the job's lines, and Celery's own line on its outcome, carry it. A job
with none (a beat sweep) runs with none.
"""

from __future__ import annotations

from typing import Any

from celery.signals import setup_logging, task_prerun

from app.logs import context
from app.logs.setup import LogFormat, configure


def install(*, service: str, log_format: LogFormat, level: str) -> None:
    """Configure logging and connect the receivers, before the Celery command starts
    (it warns, running as root, before it would configure logging itself)."""
    configure(level, log_format, service)

    # A receiver on setup_logging stops Celery configuring logging itself.
    def configure_logging(loglevel: int | str | None = None, **_: Any) -> None:
        configure(loglevel or "info", log_format, service)

    setup_logging.connect(configure_logging, weak=False)
    task_prerun.connect(_bind_request_id, weak=False)


def _bind_request_id(task: Any = None, **_: Any) -> None:
    # Custom message headers appear as attributes of the task's request.
    request_id = getattr(task.request, context.JOB_HEADER, None) if task is not None else None
    context.bind(context.accepted(request_id) if isinstance(request_id, str) else None)


def job_headers() -> dict[str, str] | None:
    """The headers a job message carries from the current context."""
    request_id = context.current()
    return {context.JOB_HEADER: request_id} if request_id else None
