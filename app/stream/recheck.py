"""The periodic re-check of every task stream of one web process, in one query.

A notification can be lost (Redis unreachable when it was published), so
every stream looks at the database every `taskPollInterval` anyway. Done
stream by stream, that is one claim transaction per stream per interval:
10,000 idle streams would cost 2,000 transactions a second and keep a web
process busy doing nothing. Instead one task per process asks, every
interval, which of its connected agents have pending tasks or are gone,
and wakes just those streams with RESYNC: they claim (or find their agent
deleted) as on any other wake-up. A lost notification still delays a task
by one interval at most; it is never lost.

When the database cannot answer, every stream is woken: each then fails
its own claim and closes with 1013, as it would have on its own re-check.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Iterable

from sqlalchemy import select
from sqlalchemy.exc import DBAPIError
from sqlmodel import col
from starlette.concurrency import run_in_threadpool

from app.db import transaction
from app.models import Agent, Task
from app.runtime import Runtime
from app.stream.hub import RESYNC, Subscription

log = logging.getLogger(__name__)

# Agent ids per statement: well under SQLite's limit on bound parameters.
CHUNK = 500


class Recheck:
    """Wakes, every interval, the streams whose agent has pending tasks or was deleted.

    Runs on the event loop; its task exists only while some stream does.
    """

    def __init__(self, runtime: Runtime) -> None:
        self._runtime = runtime
        self._interval = runtime.settings.task_poll_interval
        # Subscriptions compare by identity: a dict is an ordered set of them.
        self._streams: dict[Subscription, None] = {}
        self._task: asyncio.Task[None] | None = None

    def add(self, subscription: Subscription) -> None:
        self._streams[subscription] = None
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="stella-stream-recheck")

    def discard(self, subscription: Subscription) -> None:
        self._streams.pop(subscription, None)
        if not self._streams and self._task is not None:
            self._task.cancel()
            self._task = None

    def __len__(self) -> int:
        return len(self._streams)

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self._interval)
            await self.check()

    async def check(self) -> None:
        """One re-check of every stream now (the task calls it every interval)."""
        agent_ids = {subscription.agent_id for subscription in self._streams}
        if not agent_ids:
            return
        try:
            due = await run_in_threadpool(self._due, agent_ids)
        except DBAPIError as exc:
            log.warning("task stream re-check: database unavailable (%s)", type(exc).__name__)
            due = agent_ids
        for subscription in list(self._streams):
            if subscription.agent_id in due:
                subscription.queue.put_nowait(RESYNC)

    def _due(self, agent_ids: Iterable[uuid.UUID]) -> set[uuid.UUID]:
        """Those of `agent_ids` with a pending task, or no longer registered."""
        ordered = list(agent_ids)
        due: set[uuid.UUID] = set()
        with transaction(self._runtime.engine) as session:
            for start in range(0, len(ordered), CHUNK):
                chunk = ordered[start : start + CHUNK]
                pending = session.scalars(
                    select(col(Task.agent_id))
                    .where(col(Task.agent_id).in_(chunk), col(Task.status) == "pending")
                    .distinct()
                )
                due.update(pending)
                registered = set(
                    session.scalars(select(col(Agent.id)).where(col(Agent.id).in_(chunk)))
                )
                due.update(agent_id for agent_id in chunk if agent_id not in registered)
        return due
