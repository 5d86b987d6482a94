"""Sweeps: set-based, guarded, idempotent.

Each sweep is a guarded UPDATE (or DELETE) … RETURNING, so two beats by
mistake, or two overlapping runs, change every row at most once, and only
the rows a run actually changed are announced.
"""

from __future__ import annotations

import datetime as dt
import logging
import uuid
from dataclasses import dataclass

from sqlalchemy import delete, or_, select, update
from sqlmodel import Session, col

from app.certs import renew_at
from app.certs import service as certs_service
from app.db import after_commit
from app.jobs import EXPAND_DISPATCH, JobQueue
from app.models import Agent, Dispatch, RegistrationToken, Task
from app.models.types import utcnow
from app.notify import AgentEvent, Notifier
from app.settings import Settings
from app.sweeps import guard
from app.tasks import lost_work
from app.tasks import service as tasks_service
from app.tasks.schemas import RUNNING_STATUSES
from pki import CertificateAuthority, load_public_key_pem

log = logging.getLogger(__name__)

LIVE_STATUSES = guard.LIVE_STATUSES
OUTAGE_MARK = guard.MARK  # the sweeps that judge by silence share one mark
RENEWAL_BATCH = 500


def mark_offline(
    *,
    session: Session,
    settings: Settings,
    notifier: Notifier | None = None,
    now: dt.datetime | None = None,
) -> list[uuid.UUID]:
    """Agents silent for STELLA_OFFLINE_AFTER_MISSED intervals become offline.

    One statement over the (status, last_heartbeat) index: its cost follows
    the number of stale agents, not the size of the fleet. Held while the
    mass-offline guard is engaged (`app.sweeps.guard`): after an outage of
    the control plane, or when too many agents fell silent at once.
    """
    now = now or utcnow()
    mark = guard.lock(session=session, settings=settings, now=now)
    window = offline_window(settings)
    if guard.holds(mark, now) or guard.trips(
        session=session, settings=settings, mark=mark, cutoff=now - window, now=now
    ):
        return []
    rows = session.execute(
        update(Agent)
        .where(col(Agent.status).in_(LIVE_STATUSES), col(Agent.last_heartbeat) < now - window)
        .values(status="offline")
        .returning(col(Agent.id)),
        execution_options={"synchronize_session": False},
    )
    marked = [row[0] for row in rows]
    guard.release(mark, marked=len(marked), now=now)
    lost_work.mark_unknown(session=session, settings=settings, marked=marked)
    if notifier is not None and marked:
        events = [AgentEvent("agent_offline", agent_id=agent_id) for agent_id in marked]
        after_commit(session, lambda: notifier.publish_fleet(events))
    return marked


def offline_window(settings: Settings) -> dt.timedelta:
    return guard.offline_window(settings)


def held_after_outage(*, session: Session, settings: Settings, now: dt.datetime) -> bool:
    """True while the sweeps wait out the grace that follows an outage.

    No sweep for longer than the offline window means the control plane (or
    its database) was down, and then no agent could be heard either. As a
    new leader does after a failover, the sweeps give every agent one full
    window from now before judging it: only agents silent through that
    grace are marked offline, and only tasks whose agent could report again
    are timed out. Both sweeps keep the one mark, so whichever runs first
    after the outage notices it; its row lock orders overlapping runs.
    (The outage is one reason of the mass-offline guard: `app.sweeps.guard`.)
    """
    mark = guard.lock(session=session, settings=settings, now=now)
    return guard.holds(mark, now, guard.OUTAGE)


@dataclass(frozen=True)
class TimedOut:
    task_id: uuid.UUID
    agent_id: uuid.UUID


def time_out_tasks(
    *, session: Session, settings: Settings, notifier: Notifier, now: dt.datetime | None = None
) -> list[TimedOut]:
    """Tasks not finished within `timeout` seconds of assignment become timed_out.

    Candidates are read first (work in flight only), then ended by a guarded
    UPDATE: a task completed meanwhile, or ended by an overlapping sweep, is
    left alone. Each agent is told to stop its task. Held, like the offline
    sweep, after an outage: a task finished meanwhile is reported first.
    """
    now = now or utcnow()
    if held_after_outage(session=session, settings=settings, now=now):
        return []
    lost_work.mark_unknown(session=session, settings=settings)  # not timed out: unknown
    candidates = session.execute(
        select(col(Task.id), col(Task.assigned_at), col(Task.timeout)).where(
            col(Task.status).in_(RUNNING_STATUSES)
        )
    ).all()
    expired = [
        task_id
        for task_id, assigned_at, timeout in candidates
        if assigned_at is not None and assigned_at + dt.timedelta(seconds=timeout) <= now
    ]
    if not expired:
        return []
    rows = session.execute(
        update(Task)
        .where(col(Task.id).in_(expired), col(Task.status).in_(RUNNING_STATUSES))
        .values(
            status="timed_out",
            completed_at=now,
            error="task did not finish within its timeout",
            credentials_encrypted=None,
        )
        .returning(col(Task.id), col(Task.agent_id)),
        execution_options={"synchronize_session": False},
    ).all()
    ended = [TimedOut(task_id=task_id, agent_id=agent_id) for task_id, agent_id in rows]
    tasks_service.notify_cancelled(
        session=session, notifier=notifier, ended=[(item.task_id, item.agent_id) for item in ended]
    )
    return ended


def issue_renewals(
    *,
    session: Session,
    ca: CertificateAuthority,
    settings: Settings,
    now: dt.datetime | None = None,
    limit: int = RENEWAL_BATCH,
) -> int:
    """Issue ahead of time the renewals of live agents about to enter the renewal window.

    A heartbeat inside the window then hands out the stored certificate
    instead of signing on the hot path. The UPDATE is guarded by the serial
    it replaces, so two overlapping runs issue one renewal per agent.
    Under STELLA_CERT_RENEW_AT each agent's own (jittered) renewal point
    counts, as on its heartbeat: read up to the earliest any agent may be
    due, then keep those actually due.
    """
    now = now or utcnow()
    ahead = dt.timedelta(seconds=2 * settings.resolved_sweep_interval)
    lead = renew_at.largest_threshold(settings) + ahead
    candidates = session.execute(
        select(
            col(Agent.id), col(Agent.public_key_pem), col(Agent.cert_serial),
            col(Agent.cert_not_after),
        )
        .where(col(Agent.status).in_(LIVE_STATUSES), col(Agent.cert_not_after) < now + lead)
        .order_by(col(Agent.cert_not_after))
        .limit(limit)
    ).all()  # fmt: skip
    due = [
        (agent_id, public_key_pem, serial)
        for agent_id, public_key_pem, serial, not_after in candidates
        if renew_at.renewal_due(settings, agent_id, not_after, now + ahead)
    ]
    renewed = 0
    for agent_id, public_key_pem, serial in due:
        issued = certs_service.issue(
            ca=ca,
            settings=settings,
            agent_id=agent_id,
            public_key=load_public_key_pem(public_key_pem),
        )
        result = session.execute(
            update(Agent)
            .where(col(Agent.id) == agent_id, col(Agent.cert_serial) == serial)
            .values(cert_pem=issued.pem, cert_serial=issued.serial, cert_not_after=issued.not_after)
            .returning(col(Agent.id)),
            execution_options={"synchronize_session": False},
        ).first()
        if result is not None:
            certs_service.audit_renewal(
                session=session, agent_id=agent_id, renewed=issued, previous=serial, by_sweep=True
            )
            renewed += 1
    return renewed


def purge_tokens(*, session: Session, now: dt.datetime | None = None) -> int:
    """Delete registration tokens that can never be used again."""
    now = now or utcnow()
    rows = session.execute(
        delete(RegistrationToken)
        .where(
            or_(
                col(RegistrationToken.expires_at) <= now,
                col(RegistrationToken.used_at).is_not(None),
            )
        )
        .returning(col(RegistrationToken.id))
    ).all()
    return len(rows)


def redrive_dispatches(
    *, session: Session, settings: Settings, jobs: JobQueue, now: dt.datetime | None = None
) -> list[uuid.UUID]:
    """Enqueue again the expansion of dispatches that made no progress for a while.

    A worker killed mid-expansion, or a wake-up lost on the broker, leaves a
    dispatch pending or expanding; expansion is idempotent, so driving it
    again creates only the missing tasks. The touch of `updated_at` is
    guarded, so two overlapping sweeps re-drive a dispatch once.
    """
    now = now or utcnow()
    cutoff = now - dt.timedelta(seconds=settings.dispatch_stall_after)
    stalled = session.execute(
        select(col(Dispatch.id), col(Dispatch.updated_at)).where(
            col(Dispatch.status).in_(("pending", "expanding")), col(Dispatch.updated_at) < cutoff
        )
    ).all()
    redriven: list[uuid.UUID] = []
    for dispatch_id, updated_at in stalled:
        touched = session.execute(
            update(Dispatch)
            .where(col(Dispatch.id) == dispatch_id, col(Dispatch.updated_at) == updated_at)
            .values(updated_at=now)
            .returning(col(Dispatch.id)),
            execution_options={"synchronize_session": False},
        ).first()
        if touched is not None:
            redriven.append(dispatch_id)

    def enqueue() -> None:
        for dispatch_id in redriven:
            jobs.enqueue(EXPAND_DISPATCH, str(dispatch_id))

    after_commit(session, enqueue)
    return redriven
