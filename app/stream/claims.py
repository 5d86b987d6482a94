"""Claims for every stream of one web process, batched into one transaction.

A selector dispatch to a thousand connected agents wakes a thousand
streams within milliseconds; each claiming on its own would be a
thousand transactions, queued on the thread pool and the connection pool,
and the last agent would wait for all of them. Streams ask `ClaimBatcher`
instead: the claims that arrive while one batch is in the database go
together in the next, one transaction for all (`claim_pending_for_agents`,
exactly-once as a single claim is). A lone claim waits for nothing.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Sequence

from sqlalchemy import select
from sqlmodel import col
from starlette.concurrency import run_in_threadpool

from app.db import transaction
from app.models import Agent
from app.runtime import Runtime
from app.tasks import service as tasks_service
from app.tasks.schemas import TaskDelivery

# Agents per transaction: well under SQLite's limit on bound parameters.
MAX_BATCH = 500


class AgentGone(Exception):
    """The agent was deleted: its stream must close."""


class ClaimBatcher:
    """Runs on the event loop; the transactions run in worker threads."""

    def __init__(self, runtime: Runtime) -> None:
        self._runtime = runtime
        self._waiting: dict[uuid.UUID, list[asyncio.Future[list[TaskDelivery]]]] = {}
        # A strong reference: the loop keeps only weak ones, and a drain
        # collected mid-flight would leave every later claim waiting.
        self._drainer: asyncio.Task[None] | None = None

    async def claim(self, agent_id: uuid.UUID) -> list[TaskDelivery]:
        """The agent's pending tasks, now assigned to it, best first (AgentGone if deleted)."""
        future: asyncio.Future[list[TaskDelivery]] = asyncio.get_running_loop().create_future()
        self._waiting.setdefault(agent_id, []).append(future)
        if self._drainer is None or self._drainer.done():
            self._drainer = asyncio.get_running_loop().create_task(self._drain())
        return await future

    async def _drain(self) -> None:
        while self._waiting:
            agents = list(self._waiting)[:MAX_BATCH]
            batch = {agent_id: self._waiting.pop(agent_id) for agent_id in agents}
            try:
                claimed, gone = await run_in_threadpool(self._claim_many, agents)
            except Exception as exc:  # the database is down: every waiter fails alike
                for futures in batch.values():
                    for future in futures:
                        if not future.done():
                            future.set_exception(exc)
                continue
            for agent_id, futures in batch.items():
                # One stream of an agent gets its tasks; a second waiter of the
                # same agent gets none (its tasks are already on their way).
                deliveries = claimed.get(agent_id, [])
                for future in futures:
                    if future.done():
                        continue
                    if agent_id in gone:
                        future.set_exception(AgentGone())
                    else:
                        future.set_result(deliveries)
                        deliveries = []

    def _claim_many(
        self, agent_ids: Sequence[uuid.UUID]
    ) -> tuple[dict[uuid.UUID, list[TaskDelivery]], set[uuid.UUID]]:
        cipher = self._runtime.cipher
        with transaction(self._runtime.engine) as session:
            present = set(
                session.scalars(select(col(Agent.id)).where(col(Agent.id).in_(agent_ids)))
            )
            claimed = tasks_service.claim_pending_for_agents(
                session=session, agent_ids=[a for a in agent_ids if a in present]
            )
            deliveries = {
                agent_id: [tasks_service.deliver(task, cipher) for task in tasks]
                for agent_id, tasks in claimed.items()
            }
        return deliveries, set(agent_ids) - present
