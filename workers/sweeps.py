"""The sweeps beat schedules: each job opens one transaction and calls one service."""

from __future__ import annotations

import logging

from app import embedded_broker
from app.audit import service as audit_service
from app.db import transaction
from app.sweeps import service
from workers.celery_app import celery_app
from workers.runtime import runtime

log = logging.getLogger(__name__)


@celery_app.task(name="sweeps.mark_offline")  # type: ignore[untyped-decorator]
def mark_offline() -> int:
    rt = runtime()
    with transaction(rt.engine) as session:
        marked = service.mark_offline(session=session, settings=rt.settings, notifier=rt.notifier)
    if marked:
        log.info("marked %d agents offline", len(marked))
    return len(marked)


@celery_app.task(name="sweeps.time_out_tasks")  # type: ignore[untyped-decorator]
def time_out_tasks() -> int:
    rt = runtime()
    with transaction(rt.engine) as session:
        ended = service.time_out_tasks(session=session, settings=rt.settings, notifier=rt.notifier)
    if ended:
        log.info("timed out %d tasks", len(ended))
    return len(ended)


@celery_app.task(name="sweeps.issue_renewals")  # type: ignore[untyped-decorator]
def issue_renewals() -> int:
    rt = runtime()
    with transaction(rt.engine) as session:
        return service.issue_renewals(session=session, ca=rt.ca, settings=rt.settings)


@celery_app.task(name="sweeps.purge_tokens")  # type: ignore[untyped-decorator]
def purge_tokens() -> int:
    """Housekeeping: spent registration tokens, and audit events past their retention."""
    rt = runtime()
    with transaction(rt.engine) as session:
        purged = service.purge_tokens(session=session)
        pruned = audit_service.prune(session=session, settings=rt.settings)
    if pruned:
        log.info(
            "pruned %d audit events older than %d days", pruned, rt.settings.audit_retention_days
        )
    return purged


@celery_app.task(name="sweeps.redrive_dispatches")  # type: ignore[untyped-decorator]
def redrive_dispatches() -> int:
    rt = runtime()
    with transaction(rt.engine) as session:
        redriven = service.redrive_dispatches(session=session, settings=rt.settings, jobs=rt.jobs)
    if redriven:
        log.warning("re-driving %d stalled dispatches", len(redriven))
    return len(redriven)


@celery_app.task(name="sweeps.prune_embedded_broker")  # type: ignore[untyped-decorator]
def prune_embedded_broker() -> int:
    pruned = embedded_broker.prune(runtime().settings)
    if pruned:
        log.info("pruned %d stale monitoring messages from the embedded broker", pruned)
    return pruned
