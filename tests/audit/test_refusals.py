"""app.audit.refusals: refused calls counted in memory, written coalesced and bounded.

Against the real database of the session stack (SQLite and PostgreSQL); each
test names its own agents, so rows the stack's own recorder writes meanwhile
do not interfere.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import uuid
from pathlib import Path

from sqlalchemy import Engine, select
from sqlmodel import SQLModel, col

from app.audit.refusals import OVERFLOW_REASON, Refusal, RefusalRecorder
from app.db import make_engine
from app.models import AuditEvent
from tests.conftest import Stack

T0 = dt.datetime(2026, 3, 1, 12, 0, tzinfo=dt.UTC)


def refusal(agent_id: uuid.UUID, reason: str = "agent token is invalid") -> Refusal:
    return Refusal(
        reason=reason,
        status=401,
        route="POST /api/v1/agents/{id}/heartbeat",
        source="192.0.2.7",
        agent_id=agent_id,
    )


def rows(engine: Engine, *agent_ids: uuid.UUID | None) -> list[AuditEvent]:
    with engine.connect() as connection:
        found = connection.execute(select(AuditEvent).order_by(col(AuditEvent.id))).all()
    return [AuditEvent.model_validate(row._mapping) for row in found if row.agent_id in agent_ids]


class TestCoalescing:
    def test_one_event_per_key_with_its_count(self, stack: Stack) -> None:
        engine = stack.runtime.engine
        flooded, other = uuid.uuid4(), uuid.uuid4()
        recorder = RefusalRecorder(engine, interval=60)
        for second in range(50):
            recorder.refused(refusal(flooded), at=T0 + dt.timedelta(seconds=second))
        recorder.refused(refusal(other), at=T0)
        recorder.refused(refusal(other, "agent is not registered"), at=T0)
        asyncio.run(recorder.flush())

        events = rows(engine, flooded, other)
        assert len(events) == 3
        flood = next(event for event in events if event.agent_id == flooded)
        assert flood.action == "auth.refused"
        assert flood.actor == "anonymous"
        assert flood.source == "192.0.2.7"
        assert flood.count == 50
        assert flood.at == T0
        assert flood.detail == {
            "reason": "agent token is invalid",
            "status": 401,
            "route": "POST /api/v1/agents/{id}/heartbeat",
            "lastAt": "2026-03-01T12:00:49.000Z",
        }
        assert sorted(event.count for event in events if event.agent_id == other) == [1, 1]

        asyncio.run(recorder.flush())  # nothing new: nothing written
        assert len(rows(engine, flooded, other)) == 3

    def test_keys_beyond_capacity_are_counted_in_one_overflow_event(self, stack: Stack) -> None:
        engine = stack.runtime.engine
        agents = [uuid.uuid4() for _ in range(5)]
        recorder = RefusalRecorder(engine, interval=60, capacity=2)
        for agent_id in agents:
            recorder.refused(refusal(agent_id), at=T0)
        recorder.refused(refusal(agents[0]), at=T0)  # a kept key is still counted as itself
        recorder.refused(refusal(agents[4]), at=T0 + dt.timedelta(seconds=5))
        asyncio.run(recorder.flush())

        kept = rows(engine, *agents)
        assert {(event.agent_id, event.count) for event in kept} == {(agents[0], 2), (agents[1], 1)}
        overflow = [
            event for event in rows(engine, None) if event.detail.get("overflow") and event.at == T0
        ]
        assert len(overflow) == 1
        assert overflow[0].count == 4
        assert overflow[0].detail == {
            "reason": OVERFLOW_REASON,
            "overflow": True,
            "lastAt": "2026-03-01T12:00:05.000Z",
        }


class TestWriteBehind:
    def test_the_loop_writes_by_itself_and_a_stop_writes_the_rest(self, stack: Stack) -> None:
        engine = stack.runtime.engine
        early, late = uuid.uuid4(), uuid.uuid4()

        async def scenario() -> list[AuditEvent]:
            recorder = RefusalRecorder(engine, interval=0.05)
            await recorder.start()
            recorder.refused(refusal(early))
            for _ in range(100):
                await asyncio.sleep(0.05)
                if rows(engine, early):
                    break
            written = rows(engine, early)
            recorder.refused(refusal(late))
            await recorder.stop()
            return written

        assert [event.count for event in asyncio.run(scenario())] == [1]
        assert [event.count for event in rows(engine, late)] == [1]

    def test_a_failed_write_keeps_its_counts(self, tmp_path: Path) -> None:
        """The table missing stands for a database that fails: nothing is lost, nothing raised."""
        engine = make_engine(f"sqlite:///{tmp_path / 'audit.db'}")
        try:
            agent_id = uuid.uuid4()
            recorder = RefusalRecorder(engine, interval=60)
            recorder.refused(refusal(agent_id), at=T0)
            asyncio.run(recorder.flush())
            recorder.refused(refusal(agent_id), at=T0 + dt.timedelta(seconds=1))
            SQLModel.metadata.create_all(engine, tables=[SQLModel.metadata.tables["audit_events"]])
            asyncio.run(recorder.flush())
            assert [(event.count, event.at) for event in rows(engine, agent_id)] == [(2, T0)]
        finally:
            engine.dispose()
