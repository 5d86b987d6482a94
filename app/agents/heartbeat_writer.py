"""Heartbeats written behind: one statement per web process per flush interval.

At 100,000 agents a web process receives thousands of heartbeats a second;
one UPDATE each is most of what they would cost. The writer keeps the
latest heartbeat of each agent in memory and writes them all every
STELLA_HEARTBEAT_FLUSH_INTERVAL seconds in one statement. What this trades,
stated in the README:

- a web process killed outright loses at most its last interval of
  heartbeats (a clean stop flushes first); the agent's next heartbeat
  restores them, long before three missed intervals make it offline;
- `lastHeartbeat` as read through the API lags by up to the interval;
- while a flush is failing (the database is down) nothing more is taken on
  trust: heartbeats go the full path, which answers 503 with Retry-After
  until the database is back.

A write never moves `last_heartbeat` backwards (an agent that moved to
another web process may be written by both), and the flush reports which
agents it did not find, so that their cached registration is dropped.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import uuid
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import anyio
import anyio.to_thread
from sqlalchemy import Connection, Engine, text, update
from sqlmodel import col

from app.agents.schemas import Heartbeat
from app.flush_loop import FlushLoop
from app.models import Agent

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Beat:
    """What one heartbeat changes on its agent's row."""

    agent_id: uuid.UUID
    at: dt.datetime
    reported_status: str
    resource_usage: dict[str, Any] | None
    capabilities: list[str] | None
    running_tasks: int

    @classmethod
    def of(cls, agent_id: uuid.UUID, report: Heartbeat, at: dt.datetime) -> Beat:
        usage = report.resource_usage
        return cls(
            agent_id=agent_id,
            at=at,
            reported_status=report.status,
            resource_usage=usage.model_dump(exclude_none=True) if usage is not None else None,
            capabilities=list(report.capabilities) if report.capabilities is not None else None,
            running_tasks=report.running_tasks,
        )

    def following(self, earlier: Beat | None) -> Beat:
        """This beat, keeping what an earlier unwritten one reported that this one left out."""
        if earlier is None or (self.resource_usage is not None and self.capabilities is not None):
            return self
        return replace(
            self,
            resource_usage=(
                self.resource_usage if self.resource_usage is not None else earlier.resource_usage
            ),
            capabilities=self.capabilities
            if self.capabilities is not None
            else earlier.capabilities,
        )

    @property
    def status(self) -> str:
        return "online" if self.reported_status == "healthy" else "degraded"


def write_beats(connection: Connection, beats: list[Beat]) -> set[uuid.UUID]:
    """Apply `beats` (one per agent); the ids of the agents whose row was written."""
    if not beats:
        return set()
    if connection.dialect.name == "postgresql":
        return _write_postgresql(connection, beats)
    return _write_each(connection, beats)


# One statement for the whole batch: arrays in, one row per agent out.
_UNNEST_UPDATE = text("""
    UPDATE agents AS a SET
        last_heartbeat = v.at,
        reported_status = v.reported_status,
        status = v.status,
        resource_usage = CASE WHEN v.usage IS NULL THEN a.resource_usage
                              ELSE CAST(v.usage AS jsonb) END,
        capabilities = CASE WHEN v.caps IS NULL THEN a.capabilities
                            ELSE CAST(v.caps AS jsonb) END,
        running_tasks = v.running_tasks
    FROM unnest(
        CAST(:ids AS uuid[]), CAST(:ats AS timestamptz[]), CAST(:reported AS text[]),
        CAST(:statuses AS text[]), CAST(:usages AS text[]), CAST(:caps AS text[]),
        CAST(:running AS integer[])
    ) AS v(id, at, reported_status, status, usage, caps, running_tasks)
    WHERE a.id = v.id AND a.last_heartbeat <= v.at
    RETURNING a.id
""")


def _write_postgresql(connection: Connection, beats: list[Beat]) -> set[uuid.UUID]:
    rows = connection.execute(
        _UNNEST_UPDATE,
        {
            "ids": [beat.agent_id for beat in beats],
            "ats": [beat.at for beat in beats],
            "reported": [beat.reported_status for beat in beats],
            "statuses": [beat.status for beat in beats],
            "usages": [_json(beat.resource_usage) for beat in beats],
            "caps": [_json(beat.capabilities) for beat in beats],
            "running": [beat.running_tasks for beat in beats],
        },
    )
    return {row[0] for row in rows}


def _write_each(connection: Connection, beats: list[Beat]) -> set[uuid.UUID]:
    # SQLite: statements are in-process calls, so one per agent costs little.
    written: set[uuid.UUID] = set()
    for beat in beats:
        values: dict[str, Any] = {
            "last_heartbeat": beat.at,
            "reported_status": beat.reported_status,
            "status": beat.status,
            "running_tasks": beat.running_tasks,
        }
        if beat.resource_usage is not None:
            values["resource_usage"] = beat.resource_usage
        if beat.capabilities is not None:
            values["capabilities"] = beat.capabilities
        row = connection.execute(
            update(Agent)
            .where(col(Agent.id) == beat.agent_id, col(Agent.last_heartbeat) <= beat.at)
            .values(values)
            .returning(col(Agent.id))
        ).first()
        if row is not None:
            written.add(beat.agent_id)
    return written


def _json(value: object) -> str | None:
    return None if value is None else json.dumps(value)


class HeartbeatWriter:
    """The latest heartbeat of each agent, written every `interval` seconds.

    `record` and the flush loop run on the event loop; the statement runs
    in a worker thread. `on_missing` hears the agents a flush did not find.
    """

    def __init__(
        self,
        engine: Engine,
        *,
        interval: float,
        on_missing: Callable[[set[uuid.UUID]], None],
    ) -> None:
        self._engine = engine
        self._on_missing = on_missing
        self._buffer: dict[uuid.UUID, Beat] = {}
        self._failing = False
        self._loop = FlushLoop(self.flush, interval=interval, name="stella-heartbeat-writer")
        # A thread of its own: under load the shared request threads are all
        # busy, and a flush queued behind them would outlast the stated window.
        self._thread: anyio.CapacityLimiter | None = None

    @property
    def failing(self) -> bool:
        """The last flush could not write: what is acknowledged now is not persisted."""
        return self._failing

    def record(self, beat: Beat) -> None:
        self._buffer[beat.agent_id] = beat.following(self._buffer.get(beat.agent_id))

    async def start(self) -> None:
        self._thread = anyio.CapacityLimiter(1)
        await self._loop.start()

    async def stop(self) -> None:
        """Stop the loop and write what is left (a clean stop loses nothing)."""
        await self._loop.stop()

    async def flush(self) -> None:
        if not self._buffer:
            return
        batch, self._buffer = self._buffer, {}
        beats = list(batch.values())
        try:
            written = await anyio.to_thread.run_sync(self._write, beats, limiter=self._thread)
        except Exception as exc:  # the database is down: keep the beats, retry next time
            log.warning("could not write %d heartbeats (%s); retrying", len(beats), exc)
            self._failing = True
            for agent_id, beat in batch.items():
                newer = self._buffer.get(agent_id)
                self._buffer[agent_id] = newer.following(beat) if newer else beat
            return
        self._failing = False
        missing = set(batch) - written
        if missing:
            self._on_missing(missing)

    def _write(self, beats: list[Beat]) -> set[uuid.UUID]:
        with self._engine.begin() as connection:
            return write_beats(connection, beats)
