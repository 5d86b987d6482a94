"""Background jobs: how the web process hands work to the Celery workers.

A job message carries ids only (never payloads or credentials, which Flower
would show); the job reads everything else from the database. The app knows
jobs by name alone: their bodies live in `workers/`, which imports the app,
never the other way round.

Job names:
    dispatch.expand(dispatch_id)      fan a selector dispatch out into tasks
    sweeps.mark_offline()             agents silent for too long
    sweeps.time_out_tasks()           tasks past their timeout
    sweeps.issue_renewals()           certificates entering the renewal window
    sweeps.purge_tokens()             expired and used registration tokens; old audit events
    sweeps.redrive_dispatches()       dispatches whose expansion stalled
    sweeps.prune_embedded_broker()    stale monitoring messages (embedded broker only)
"""

from __future__ import annotations

import logging
from typing import Any, Protocol

from celery import Celery

from app import embedded_broker
from app.logs.jobs import job_headers
from app.settings import Settings

log = logging.getLogger(__name__)

EXPAND_DISPATCH = "dispatch.expand"


class JobQueue(Protocol):
    def enqueue(self, name: str, *args: str) -> None: ...


class CeleryJobQueue:
    """Sends jobs by name through the configured broker."""

    def __init__(self, celery: Celery) -> None:
        self.celery = celery

    def enqueue(self, name: str, *args: str) -> None:
        self.celery.send_task(name, args=list(args), headers=job_headers())


def broker_url(settings: Settings) -> str:
    """The configured broker, or the embedded one (app/embedded_broker.py)."""
    return settings.broker_url or "filesystem://"


def uses_embedded_broker(settings: Settings) -> bool:
    return broker_url(settings).startswith("filesystem:")


def prepare_embedded_broker(settings: Settings, *, consumer: bool) -> None:
    if uses_embedded_broker(settings):
        embedded_broker.prepare(settings, consumer=consumer)


def celery_config(settings: Settings) -> dict[str, Any]:
    """The Celery configuration every process shares (web, worker, beat, Flower)."""
    config: dict[str, Any] = {
        "broker_url": broker_url(settings),
        "task_serializer": "json",
        "accept_content": ["json"],
        "result_serializer": "json",
        "task_ignore_result": True,
        # A job is acknowledged after it ran; a worker lost mid-job hands it back.
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "worker_prefetch_multiplier": 1,
        # Events for Flower.
        "worker_send_task_events": True,
        "task_send_sent_event": True,
        "broker_connection_retry_on_startup": True,
        # The web process must not hang on a broker that is down: the
        # database holds the work and a sweep re-drives it.
        "broker_connection_timeout": 2,
        "task_publish_retry_policy": {
            "max_retries": 2,
            "interval_start": 0,
            "interval_step": 0.2,
            "interval_max": 0.5,
        },
        "timezone": "UTC",
        "enable_utc": True,
        "worker_hijack_root_logger": False,
    }
    if uses_embedded_broker(settings):
        config["broker_transport"] = embedded_broker.TRANSPORT
        config["broker_transport_options"] = embedded_broker.transport_options(settings)
    elif settings.broker_key_prefix:
        config["broker_transport_options"] = {"global_keyprefix": settings.broker_key_prefix}
    return config


def make_celery(settings: Settings) -> Celery:
    """A Celery app configured from settings (without the job modules)."""
    celery = Celery("stella", set_as_current=False)
    celery.conf.update(celery_config(settings))
    return celery
