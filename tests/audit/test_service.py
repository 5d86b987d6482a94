"""app.audit.service, and the sweep's renewals it records. Both backends."""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Callable

import pytest
from sqlalchemy import select
from sqlmodel import col

from app.audit import service
from app.db import transaction
from app.models import Agent, AuditEvent
from app.models.types import utcnow
from app.settings import Settings
from app.sweeps import service as sweeps_service
from tests.agents.helpers import set_agent
from tests.conftest import AgentClient, Stack


def stored(stack: Stack) -> list[AuditEvent]:
    with transaction(stack.runtime.engine) as session:
        return list(session.scalars(select(AuditEvent).order_by(col(AuditEvent.id))).all())


class TestRecord:
    def test_kept_only_when_the_transaction_commits(self, stack: Stack) -> None:
        agent_id = uuid.uuid4()

        def failing_change() -> None:
            with transaction(stack.runtime.engine) as session:
                service.record(
                    session=session, action="agent.deleted", actor="operator", agent_id=agent_id
                )
                raise RuntimeError("the change failed")

        with pytest.raises(RuntimeError):
            failing_change()
        assert [event for event in stored(stack) if event.agent_id == agent_id] == []

        with transaction(stack.runtime.engine) as session:
            service.record(
                session=session,
                action="agent.deleted",
                actor="operator",
                agent_id=agent_id,
                source="198.51.100.1",
                detail={"name": "gone"},
            )
        [event] = [event for event in stored(stack) if event.agent_id == agent_id]
        assert (event.action, event.actor, event.source, event.count) == (
            "agent.deleted",
            "operator",
            "198.51.100.1",
            1,
        )
        assert event.detail == {"name": "gone"}
        assert abs((event.at - utcnow()).total_seconds()) < 60


class TestPrune:
    def test_deletes_only_what_is_past_retention(self, stack: Stack) -> None:
        now = utcnow()
        settings = Settings(data_dir=stack.tmp, audit_retention_days=30)
        ages = {"old": 31, "older": 400, "young": 29, "fresh": 0}
        with transaction(stack.runtime.engine) as session:
            for name, days in ages.items():
                service.record(
                    session=session,
                    action="token.created",
                    actor="operator",
                    detail={"name": name},
                    at=now - dt.timedelta(days=days),
                )
        with transaction(stack.runtime.engine) as session:
            assert service.prune(session=session, settings=settings, now=now) == 2
        assert {event.detail["name"] for event in stored(stack)} == {"young", "fresh"}
        with transaction(stack.runtime.engine) as session:
            assert service.prune(session=session, settings=settings, now=now) == 0

    def test_keeps_90_days_by_default(self) -> None:
        assert Settings.model_fields["audit_retention_days"].default == 90


class TestSweepRenewals:
    def test_renewals_issued_ahead_are_recorded_as_the_systems(
        self, stack: Stack, register: Callable[..., AgentClient]
    ) -> None:
        agent = register("sweep-renewed")
        soon = utcnow() + dt.timedelta(minutes=5)
        set_agent(stack, agent.id, cert_serial="abc123", cert_not_after=soon)
        with transaction(stack.runtime.engine) as session:
            renewed = sweeps_service.issue_renewals(
                session=session, ca=stack.runtime.ca, settings=stack.settings
            )
        assert renewed == 1
        [event] = [
            event
            for event in stored(stack)
            if event.action == "cert.renewed" and event.agent_id == uuid.UUID(agent.id)
        ]
        assert event.actor == "system"
        assert event.source is None
        with transaction(stack.runtime.engine) as session:
            row = session.get_one(Agent, uuid.UUID(agent.id))
        assert event.detail == {
            "serial": row.cert_serial,
            "notAfter": service.timestamp(row.cert_not_after),
            "previousSerial": "abc123",
        }
