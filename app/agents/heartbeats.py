"""The heartbeat path of one web process.

A heartbeat that has nothing to hand over and nothing to renew costs no
database round trip and no signature check:

1. the JWT and the client certificate are checked against verdicts kept in
   `runtime.auth` (the first heartbeat of an agent verifies them);
2. the agent's registration is known from an earlier heartbeat, and is
   forgotten the moment the agent is deleted (fleet events);
3. `PendingIndex` says whether the agent may have pending tasks;
4. the heartbeat itself is written behind (`HeartbeatWriter`).

Anything else (an agent not seen yet, a change of status, pending work, a
certificate near expiry, write-behind switched off) takes the full path:
one transaction that reads the agent, writes a status change at once (an
agent that reports unhealthy is degraded before it is answered), claims
its pending tasks atomically and renews its certificate. No check is ever
skipped: only where its answer comes from.

The caches and the index are trusted only where every process hears
every other's events (STELLA_REDIS_URL). Without Redis a Celery worker's
fan-out and another web process's deletion go unheard, so each heartbeat
reads the agent and claims from the database, as the embedded single-node
default can well afford; the write-behind still applies.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import hmac
import logging
import uuid
from dataclasses import dataclass

from sqlalchemy import select
from sqlmodel import col
from starlette.concurrency import run_in_threadpool

from app.agents.heartbeat_writer import Beat, HeartbeatWriter, write_beats
from app.agents.schemas import CertificateRenewal, Heartbeat, HeartbeatAnswer
from app.auth.cache import Registration
from app.auth.service import registered_agent
from app.certs import service as certs_service
from app.certs.renew_at import renewal_due
from app.db import transaction
from app.errors import Forbidden, Unauthorized
from app.metrics.instruments import HEARTBEATS_RECEIVED, observe_deliveries
from app.models import Task
from app.models.types import utcnow
from app.runtime import Runtime
from app.stream.hub import RESYNC, StreamItem
from app.tasks import service as tasks_service
from app.tasks.pending_index import PendingIndex
from app.tasks.schemas import TaskDelivery
from pki import ClientIdentity

log = logging.getLogger(__name__)
# The fast lane counts its own ("fast_lane"); these come through the route.
_FULL_RECEIVED = HEARTBEATS_RECEIVED.labels("full")


@dataclass(frozen=True)
class _FullAnswer:
    registration: Registration
    written: bool
    tasks: list[TaskDelivery]
    renewal: CertificateRenewal | None


class HeartbeatService:
    """Receives heartbeats; keeps the caches, the pending index and the writer of one process."""

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        self.settings = runtime.settings
        self.auth = runtime.auth
        self.pending = PendingIndex()
        # Only with Redis does this process hear what every other one does.
        self._trust_events = runtime.settings.redis_url is not None
        interval = self.settings.heartbeat_flush_interval
        self.writer = (
            HeartbeatWriter(runtime.engine, interval=interval, on_missing=self._forget_agents)
            if interval > 0
            else None
        )
        self._reconcile_now = asyncio.Event()
        self._reconciler: asyncio.Task[None] | None = None

    # --- life -------------------------------------------------------------------------------

    async def start(self) -> None:
        if self.writer is not None:
            await self.writer.start()
        if self._trust_events:
            self._reconciler = asyncio.create_task(self._reconcile_loop(), name="stella-pending")

    async def stop(self) -> None:
        if self._reconciler is not None:
            self._reconciler.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reconciler
        if self.writer is not None:
            await self.writer.stop()

    async def flush(self) -> None:
        """Write what is buffered now: an operator's read then sees this process's heartbeats."""
        if self.writer is not None:
            await self.writer.flush()

    def on_event(self, item: StreamItem) -> None:
        """Fleet events (on the event loop): keep the caches and the index true."""
        if item == RESYNC:
            # Events may have been lost: trust nothing kept until re-read.
            self.auth.forget_all()
            self.pending.forget_all()
            self._reconcile_now.set()
            return
        assert not isinstance(item, str)
        if item.kind == "task_created":
            self.pending.mark(item.agent_id)
        elif item.kind in ("agent_deleted", "agent_offline"):
            # Offline: the cached "online" is stale, and the return must be written at once.
            self.auth.forget(item.agent_id)

    def _forget_agents(self, agent_ids: set[uuid.UUID]) -> None:
        for agent_id in agent_ids:
            self.auth.forget(agent_id)

    # --- heartbeats -------------------------------------------------------------------------

    async def receive(
        self,
        *,
        agent_id: uuid.UUID,
        report: Heartbeat,
        token: str | None,
        certificate_pem: str | None,
    ) -> HeartbeatAnswer | None:
        """Record the heartbeat; the answer, or None for "no tasks, no renewal"."""
        now = utcnow()
        identity = self.auth.check(token, certificate_pem, now)
        beat = Beat.of(agent_id, report, now)
        if self._steady(beat, identity, now):
            _FULL_RECEIVED.inc()
            return None
        answer = await self._full(beat, identity, renew=self._renewal_due(identity, now))
        _FULL_RECEIVED.inc()
        if answer is not None:
            observe_deliveries("heartbeat", (task.created for task in answer.tasks))
            tasks_service.log_delivered("heartbeat", agent_id, answer.tasks)
        return answer

    def receive_steady(
        self,
        *,
        agent_id: uuid.UUID,
        report: Heartbeat,
        token: str | None,
        certificate_pem: str | None,
    ) -> bool:
        """Record the heartbeat if it needs nothing but its checks and a buffered write.

        False (nothing recorded) when it needs the full path; raises as
        `receive` does when a check fails. No I/O: the fast lane calls it.
        """
        now = utcnow()
        identity = self.auth.check(token, certificate_pem, now)
        return self._steady(Beat.of(agent_id, report, now), identity, now)

    def _steady(self, beat: Beat, identity: ClientIdentity, now: dt.datetime) -> bool:
        registration = self.auth.registration(identity.agent_id)
        if (
            registration is None
            or registration.status != beat.status
            or self.writer is None
            # The database is failing: the full path answers 503 rather than
            # acknowledge beats that the stated write-behind window cannot hold.
            or self.writer.failing
            or self.pending.maybe_pending(identity.agent_id)
            or self._renewal_due(identity, now)
        ):
            return False
        if not hmac.compare_digest(registration.key_thumbprint, identity.key_thumbprint):
            raise Unauthorized("agent is not registered")
        if identity.agent_id != beat.agent_id:
            raise Forbidden("agent not authorized for this operation")
        self.writer.record(beat)
        return True

    def _renewal_due(self, identity: ClientIdentity, now: dt.datetime) -> bool:
        return renewal_due(self.settings, identity.agent_id, identity.not_after, now)

    async def _full(
        self, beat: Beat, identity: ClientIdentity, *, renew: bool
    ) -> HeartbeatAnswer | None:
        auth_epoch = self.auth.epoch
        claim = self.pending.maybe_pending(identity.agent_id)
        generation = self.pending.generation(identity.agent_id)
        answer = await run_in_threadpool(
            self._full_transaction, beat, identity, claim=claim, renew=renew
        )
        if self._trust_events:
            self.auth.remember(identity.agent_id, answer.registration, epoch=auth_epoch)
        if claim and len(answer.tasks) < tasks_service.CLAIM_BATCH:
            self.pending.settle(identity.agent_id, generation)
        if not answer.written:
            assert self.writer is not None
            self.writer.record(beat)
        if not answer.tasks and answer.renewal is None:
            return None
        return HeartbeatAnswer(tasks=answer.tasks, certificate_renewal=answer.renewal)

    def _full_transaction(
        self, beat: Beat, identity: ClientIdentity, *, claim: bool, renew: bool
    ) -> _FullAnswer:
        runtime = self.runtime
        with transaction(runtime.engine) as session:
            # A renewal locks the row: concurrent heartbeats of one agent then
            # hand out the one certificate the first of them signed.
            agent = registered_agent(session, identity, lock=renew)
            if identity.agent_id != beat.agent_id:
                raise Forbidden("agent not authorized for this operation")
            # A change of status is written now; the same status, behind.
            written = self.writer is None or agent.status != beat.status
            if written and not write_beats(session.connection(), [beat]):
                raise Unauthorized("agent is not registered")  # deleted since the read
            claimed = (
                tasks_service.claim_pending(session=session, agent_id=agent.id) if claim else []
            )
            renewal = (
                certs_service.renewal_for(
                    session=session,
                    ca=runtime.ca,
                    settings=self.settings,
                    agent=agent,
                    presented_not_after=identity.not_after,
                )
                if renew
                else None
            )
            return _FullAnswer(
                registration=Registration(agent.key_thumbprint, beat.status),
                written=written,
                tasks=[tasks_service.deliver(task, runtime.cipher) for task in claimed],
                renewal=(
                    CertificateRenewal(cert=renewal.pem, expires_at=renewal.not_after)
                    if renewal
                    else None
                ),
            )

    # --- the pending index's ground truth -----------------------------------------------------

    async def _reconcile_loop(self) -> None:
        interval = self.settings.pending_reconcile_interval
        while True:
            self._reconcile_now.clear()
            epoch = self.pending.epoch
            try:
                agents = await run_in_threadpool(self._agents_with_pending_tasks)
            except Exception as exc:  # the database is down: everyone stays "maybe"
                log.warning("could not read which agents have pending tasks: %s", exc)
                await asyncio.sleep(min(interval, 1.0))
                continue
            self.pending.load(agents, epoch=epoch)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._reconcile_now.wait(), interval)

    def _agents_with_pending_tasks(self) -> list[uuid.UUID]:
        with transaction(self.runtime.engine) as session:
            rows = session.execute(
                select(col(Task.agent_id)).where(col(Task.status) == "pending").distinct()
            )
            return [row[0] for row in rows]
